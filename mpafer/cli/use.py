"""CLI commands that use a trained run: ``mpafer explain``, ``mpafer export``, ``mpafer serve-model``.

A run directory or a folder written by ``mpafer export`` is accepted wherever a run is asked for.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpafer.cli.app import app
from mpafer.cli.common import console, emit
from mpafer.errors import ConfigError, DataError

_RUN_HELP = "Run directory (config.json + prompts.safetensors) or a folder written by mpafer export."
_DEVICE_HELP = "cpu, cuda or auto (default: the run's)."


def _device(device: str | None) -> str | None:
    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


@app.command()
def explain(
    images: list[Path] = typer.Argument(..., help="Image files to explain."),
    run: Path = typer.Option(..., "--run", help=_RUN_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for one PNG per image and explanations.json."),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
) -> None:
    """Which face patches drove each prediction: a heatmap PNG per image with S_g and S_l of the top-3 classes.

    An image that cannot be read gets one error line; the others are still explained (exit code of a data
    error when any failed).
    """
    from mpafer.artifacts import atomic_write_json
    from mpafer.train.explain import explain_paths, plot_explanation, png_names
    from mpafer.train.predict import load_run

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    loaded = load_run(run, device=_device(device))
    results = explain_paths(loaded, images)
    good = [(p, e) for p, e, _ in results if e is not None]
    for _, _, error in results:
        if error is not None:
            emit(f"error: {error}", console)
    if good:
        out.mkdir(parents=True, exist_ok=True)
    records = []
    for (path, expl), name in zip(good, png_names([p.stem for p, _ in good]), strict=True):
        png = plot_explanation(expl, out / name)
        c = expl.predicted
        parts = f"S_g {expl.s_global[c]:.3f}" + (f" + S_l {expl.s_local[c]:.3f}" if expl.s_local is not None
                                                 else " (no CGLA: S_l not in the score)")
        emit(f"{path}: {expl.classes[c]} {100 * expl.probs[c]:.1f}% ({parts}) -> {png}")
        records.append({**expl.to_dict(), "png": str(png)})
    if good:
        atomic_write_json(out / "explanations.json", records)
    if len(good) < len(results):
        raise typer.Exit(DataError.exit_code)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory of a finished training (evaluated: the card gets its metrics)."),
    out_dir: Path = typer.Argument(..., help="Folder to write (must not exist or be empty)."),
    include_weights: bool = typer.Option(
        False, "--include-weights", help="Copy the frozen CLIP into the folder (default: referenced by identity)."),
    license: str = typer.Option("mit", "--license", help="License id of the model card (Hub identifiers)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR once the new folder is complete."),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
) -> None:
    """Write a self-contained folder: prompts, config, class text features, preprocessing and a model card.

    `mpafer predict --run OUT_DIR` gives the run's predictions from it; huggingface_hub.upload_folder can
    publish it as it is.
    """
    from mpafer.train.export import export_run

    manifest = export_run(run, out_dir, include_weights=include_weights, license=license,
                          device=_device(device), force=force)
    backbone = manifest["backbone"]
    where = "included in clip/" if backbone["weights_included"] else "referenced by identity"
    emit(f"exported {manifest['variant']} run: {len(manifest['classes'])} classes, CLIP {backbone['model']} "
         f"({backbone['weights_identity']}, {where})", console)
    for field in manifest.get("config_paths_cut") or []:
        emit(f"note: config field {field} named a path of this machine; exported as its last component", console)
    if not backbone["weights_included"] and (
        str(backbone["pretrained"]).endswith((".safetensors", ".bin", ".pt", ".pth"))
        or str(backbone["model"]).startswith("local-dir:")
    ):
        emit("note: the CLIP weights are a local file or folder: copy them into the exported folder under the "
             "name in its config.json, or export with --include-weights", console)
    emit(f"export {Path(out_dir).resolve()}")


@app.command("serve-model")
def serve_model(
    run: Path = typer.Option(..., "--run", help=_RUN_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Expressions per answer unless the request asks (?top_k=)."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001, help="Largest image accepted (MiB)."),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
) -> None:
    """Serve predictions over HTTP: POST /predict (multipart field 'image'), GET /health, GET /classes.

    Not to be confused with `mpafer serve-deployments`, which serves the Prefect pipeline deployments.
    Example: curl -F image=@face.jpg http://127.0.0.1:8000/predict
    """
    from mpafer.serve import serve_model as serve

    emit(f"serving {run} on http://{host}:{port} (POST /predict, GET /health, GET /classes; Ctrl-C stops)", console)
    serve(run, host=host, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024), top_k=top_k,
          device=_device(device))
