"""CLI commands: pipeline (``mpafer demo``, ``mpafer run``, ``mpafer study``, ``mpafer serve-deployments``).

The Prefect flows (``flows/``) are imported inside the commands, so ``mpafer`` stays importable
without Prefect; ``--no-prefect`` runs :func:`mpafer.pipeline.run_pipeline` or
:func:`mpafer.study.run_study` (same stages, same caches).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mpafer.cli.app import app
from mpafer.cli.common import config_from_options, console, out
from mpafer.config import Config
from mpafer.errors import MpaferError, file_system_error
from mpafer.pipeline import STAGES

#: The Prefect setting naming the loggers whose records Prefect sends to its API (read when Prefect starts).
EXTRA_LOGGERS_ENV = "PREFECT_LOGGING_EXTRA_LOGGERS"

_SETS = Annotated[list[str] | None, typer.Option("--set", help="Config override key=value (repeatable).")]
_VERBOSE = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's INFO logs.")]
_NO_PREFECT = Annotated[
    bool, typer.Option("--no-prefect", help="Run the stages in this process without Prefect (same caches).")
]
_CONFIG = Annotated[Path, typer.Option("--config", help="YAML config file (or a name under configs/).")]
_REFRESH = Annotated[
    list[str] | None,
    typer.Option("--refresh", help=f"Recompute this stage even when cached (repeatable): {', '.join(STAGES)}."),
]


def _prefect_env(verbose: bool) -> None:
    """Quiet Prefect (WARNING) unless ``--verbose``; give its ephemeral server time to start on busy machines.

    Must run before Prefect is imported; settings the user exported win.
    """
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The ephemeral server's usage telemetry has nothing to report offline; it only adds start-up work
    # and, with several runs sharing one Prefect database, "database is locked" noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The library's log lines (the epoch rows) go to the flow run's logs in Prefect's UI (flows/logs.py);
    # outside a run there is nothing to send them to, and that is not worth a warning.
    extra = [n.strip() for n in os.environ.get(EXTRA_LOGGERS_ENV, "").split(",") if n.strip()]
    if "mpafer" not in extra:
        os.environ[EXTRA_LOGGERS_ENV] = ",".join([*extra, "mpafer"])
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


class _DropUserErrors(logging.Filter):
    """Drop Prefect's console ERROR records (tracebacks, failed states) caused by an :class:`MpaferError` or
    an ``OSError`` of the file-system class (full disk, read-only folder, a file in place of a folder): the
    CLI prints that error as one line, and the Prefect API/UI keeps the full log."""

    def __init__(self) -> None:
        super().__init__()
        names, todo = set(), [MpaferError]
        while todo:
            cls = todo.pop()
            names.add(cls.__name__)
            todo.extend(cls.__subclasses__())
        self.markers = tuple(f"{n}{sep}" for n in sorted(names) for sep in ("(", ":"))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MpaferError) or (exc is not None and file_system_error(exc) is not None):
            return False
        message = record.getMessage()
        return not any(m in message for m in self.markers)


def _quiet_user_errors() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _DropUserErrors) for f in handler.filters
        ):
            handler.addFilter(_DropUserErrors())


def _with_refresh(cfg: Config, refresh: list[str] | None) -> Config:
    """``cfg`` with the ``--refresh`` stages added to ``pipeline.refresh`` (an unknown stage: one line)."""
    if refresh:
        bad = [s for s in refresh if s not in STAGES]
        if bad:
            from mpafer.errors import ConfigError

            raise ConfigError(f"unknown stage(s) for --refresh: {', '.join(bad)}; stages: {', '.join(STAGES)}")
        cfg = cfg.model_copy(
            update={"pipeline": cfg.pipeline.model_copy(update={"refresh": sorted(set(cfg.pipeline.refresh) | set(refresh))})}
        )
    return cfg


def _run(cfg: Config, verbose: bool, no_prefect: bool, refresh: list[str] | None = None, *,
         study: bool = False) -> dict[str, Any]:
    """The pipeline (or with ``study`` the study) of ``cfg``: in this process, or as its Prefect flow."""
    cfg = _with_refresh(cfg, refresh)
    if no_prefect:
        from mpafer.pipeline import run_pipeline
        from mpafer.study import run_study

        return run_study(cfg) if study else run_pipeline(cfg)
    _prefect_env(verbose)
    from flows.pipeline import mpa_fer_pipeline
    from flows.study import mpa_fer_study

    if not verbose:
        _quiet_user_errors()
    return mpa_fer_study(config=cfg) if study else mpa_fer_pipeline(config=cfg)


def _report(summary: dict[str, Any]) -> None:
    def pct(x: Any) -> str:
        return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "n/a"

    out.print(f"summary:  {summary.get('summary_path')}", highlight=False, soft_wrap=True)
    out.print(f"report:   {summary.get('report_path')}", highlight=False, soft_wrap=True)
    if summary.get("predictions_path"):
        out.print(f"predictions: {summary['predictions_path']}", highlight=False, soft_wrap=True)
    zs = summary.get("zeroshot_accuracy")
    versus = (f"; zero-shot CLIP {pct(zs)}, gain {100 * (summary['accuracy'] - zs):+.2f} points"
              if isinstance(zs, (int, float)) and isinstance(summary.get("accuracy"), (int, float)) else "")
    out.print(
        f"accuracy: {pct(summary.get('accuracy'))} (mean-class {pct(summary.get('mean_class_accuracy'))}, "
        f"macro-F1 {pct(summary.get('macro_f1'))}){versus}",
        highlight=False, soft_wrap=True,
    )
    executed = ", ".join(summary.get("executed") or []) or "nothing"
    cached = ", ".join(summary.get("cached") or []) or "nothing"
    out.print(f"stages:   computed {executed}; cached {cached} ({summary.get('total_seconds')} s)",
              highlight=False, soft_wrap=True)


@app.command()
def demo(
    sets: _SETS = None,
    project_dir: Annotated[
        Path | None, typer.Option("--project-dir", help="Project folder (default: mpafer_work/demo).")
    ] = None,
    verbose: _VERBOSE = False,
    no_prefect: _NO_PREFECT = False,
) -> None:
    """Run the whole pipeline on the embedded demo: CPU only, no network, a few minutes.

    The demo (configs/demo.yaml) uses synthetic faces, a tiny CLIP and the curated descriptions; a rerun
    reuses every artifact. Runs the mpa-fer-pipeline flow in Prefect's ephemeral mode (or against PREFECT_API_URL when set) and
    prints where summary.json and report.md are, and the accuracy.
    """
    cfg = config_from_options(None, sets, demo=True)
    if project_dir is not None:
        cfg.pipeline.project_dir = project_dir
    _report(_run(cfg, verbose, no_prefect))


@app.command()
def run(
    config: _CONFIG,
    sets: _SETS = None,
    refresh: _REFRESH = None,
    verbose: _VERBOSE = False,
    no_prefect: _NO_PREFECT = False,
) -> None:
    """Run the whole pipeline for a configuration; unchanged stages are reused.

    Example: mpafer run --config configs/rafdb_vitb16.yaml --set data.root=/data/RAF-DB
    """
    cfg = config_from_options(config, sets)
    _report(_run(cfg, verbose, no_prefect, refresh))


def _list_option(name: str, raw: str | None) -> list[str]:
    """``--variants a,b`` → ``study.variants=[a,b]`` (nothing when the option is not given)."""
    if raw is None:
        return []
    items = [x.strip() for x in raw.split(",") if x.strip()]
    return [f"study.{name}=[{','.join(items)}]"]


@app.command()
def study(
    config: _CONFIG,
    sets: _SETS = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="full, fewshot, b2n (base-to-novel) or cross (same as --set study.protocol=...).")] = None,
    variants: Annotated[str | None, typer.Option(
        "--variants", help="Comma-separated model.variant values, the table's rows (study.variants).")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds (study.seeds).")] = None,
    shots: Annotated[str | None, typer.Option("--shots", help="Few-shot: comma-separated shots (study.shots).")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Also copy table.md/.json/.parquet, the plot and report.md into this folder.")] = None,
    refresh: _REFRESH = None,
    verbose: _VERBOSE = False,
    no_prefect: _NO_PREFECT = False,
) -> None:
    """Run a protocol of prompt-learning papers: every variant x seed x setting, then one table.

    Each run goes through the pipeline's own stages and content keys (a rerun recomputes nothing; a new seed
    runs only that seed). Writes table.md/.json/.parquet, a plot and report.md (docs/STUDY.md).

    Example: mpafer study --config demo --protocol fewshot --variants coop,mpa --seeds 1,2,3
    """
    overrides = [*(sets or []), *([f"study.protocol={protocol}"] if protocol is not None else []),
                 *_list_option("variants", variants), *_list_option("seeds", seeds), *_list_option("shots", shots)]
    cfg = config_from_options(config, overrides)
    from mpafer.study.runner import check_out_dir, copy_outputs

    if out_dir is not None:
        check_out_dir(out_dir)  # before the study, not after it
    summary = _run(cfg, verbose, no_prefect, refresh, study=True)
    table = Path(summary["table_path"]).read_text(encoding="utf-8").split("\n\n")[0]
    out.print(table, markup=False, highlight=False, soft_wrap=True)
    for label, key in (("table", "table_path"), ("plot", "plot_path"), ("report", "report_path")):
        out.print(f"{label + ':':<9} {summary[key]}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"steps:    computed {len(summary['executed'])}, cached {len(summary['cached'])} of {summary['n_steps']} "
              f"({summary['total_seconds']} s)", highlight=False, soft_wrap=True)
    if out_dir is not None:
        copied = copy_outputs(summary, out_dir)
        out.print(f"copied:   {', '.join(p.name for p in copied)} to {out_dir}", markup=False, highlight=False,
                  soft_wrap=True)


@app.command("serve-deployments")
def serve_deployments(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config for the named and retrain deployments.")
    ] = None,
    sets: _SETS = None,
    cron: Annotated[
        str | None, typer.Option("--cron", help="Cron schedule of the retrain deployment (default: pipeline.schedule_cron).")
    ] = None,
    no_stages: Annotated[bool, typer.Option("--no-stages", help="Serve the pipeline flow only.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Flow runs at the same time.")] = 1,
) -> None:
    """Serve the pipeline and stage flows as Prefect deployments (until interrupted).

    Not to be confused with `mpafer serve-model`, which serves predictions over HTTP.

    Deployments: mpa-fer-pipeline/demo; for --config (or the demo) mpa-fer-pipeline/<name>, the scheduled
    mpa-fer-pipeline/retrain and mpa-fer-<stage>/<name> per stage flow.

    Start a server first (``prefect server start``) and export PREFECT_API_URL; then trigger runs with
    ``prefect deployment run 'mpa-fer-pipeline/demo' --watch``.
    """
    # Validate before Prefect starts anything: a bad config fails with one line naming the field.
    config_from_options(config, sets, demo=config is None)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        console.print(
            "[yellow]warning:[/] PREFECT_API_URL is not set: serving against a temporary local server that nothing "
            "else can reach. Start `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api."
        )
    from flows.deployments import serve_deployments as serve_flows

    serve_flows(str(config) if config else None, list(sets or []), cron, not no_stages, limit)


@app.command("serve", hidden=True, deprecated=True)
def serve(
    config: Annotated[Path | None, typer.Option("--config")] = None,
    sets: _SETS = None,
    cron: Annotated[str | None, typer.Option("--cron")] = None,
    no_stages: Annotated[bool, typer.Option("--no-stages")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 1,
) -> None:
    """Deprecated name of `mpafer serve-deployments` (kept so existing scripts and services keep working)."""
    console.print("[yellow]warning:[/] `mpafer serve` is deprecated: use `mpafer serve-deployments` (Prefect "
                  "deployments) or `mpafer serve-model` (HTTP predictions)")
    serve_deployments(config, sets, cron, no_stages, limit)
