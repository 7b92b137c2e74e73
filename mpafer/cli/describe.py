"""CLI commands: describe (class descriptions from an LLM or the committed curated file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpafer.cli.app import app, bench_app  # noqa: F401
from mpafer.cli.common import config_from_options, console


@app.command()
def describe(
    classes: Annotated[
        str,
        typer.Option(
            "--classes",
            help="Class set (rafdb, ferplus, affectnet7, affectnet8, fer2013, canonical8) or a "
            "comma-separated list of canonical class names.",
        ),
    ],
    llm_model: Annotated[
        str | None,
        typer.Option("--llm-model", help="Model name, or 'cached' for the committed descriptions file only."),
    ] = None,
    llm_base_url: Annotated[
        str | None,
        typer.Option("--llm-base-url", help="OpenAI-compatible base URL (default: OpenAI's)."),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="Descriptions per class and question.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the generated descriptions file.")] = Path(
        "prompts_cache"
    ),
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Environment variable holding the API key.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="LLM response cache (default: llm.cache_dir in the project folder)."
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file.")] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key=value (repeatable).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Report each answer on stderr.")] = False,
) -> None:
    """Get class descriptions from an LLM (cached per request) or the committed file (--llm-model cached).

    Prints the descriptions file's path, then how many requests were sent and how many answers were served
    from the cache.
    """
    from mpafer.config import build_config
    from mpafer.describe import get_descriptions, resolve_classes
    from mpafer.describe.classes import CLASS_SETS

    cfg = config_from_options(config, sets)
    data = cfg.model_dump()
    updates = {"model": llm_model, "base_url": llm_base_url, "n_descriptions": n, "api_key_env": api_key_env}
    data["llm"].update({k: v for k, v in updates.items() if v is not None})
    cfg = build_config(data)  # validates the CLI values, naming the field on error

    class_list = resolve_classes(classes)
    class_set = classes.strip() if classes.strip() in CLASS_SETS else None
    progress = (lambda msg: console.print(msg, markup=False, highlight=False)) if verbose else None
    result = get_descriptions(
        class_list,
        cfg.llm,
        out_dir=out,
        cache_dir=cache_dir if cache_dir is not None else cfg.resolve_path(cfg.llm.cache_dir),
        class_set=class_set,
        progress=progress,
    )
    typer.echo(str(result.path))
    typer.echo(f"requests sent: {result.n_requests}, answers served from cache: {result.n_cached}")
