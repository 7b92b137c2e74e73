"""HTTP prediction server for a trained run or an exported folder (``mpafer serve-model``).

FastAPI on uvicorn (both come with Prefect). The run is loaded once, and its class text features are
computed once, before the server listens; every request then runs the image encoder only.

==========================  ======================================================================
``GET /health``             ``{"status": "ok", "variant", "classes", "weights_identity", "device",
                            "max_upload_bytes"}``
``GET /classes``            ``{"classes": [...]}`` in label order
``POST /predict``           multipart/form-data with the image in the field ``image`` (query
                            ``top_k``, default 3) → ``{"filename", "label", "top": [{"label",
                            "probability"}, ...]}``, the same numbers as ``mpafer predict``
==========================  ======================================================================

Bad requests get a 4xx with ``{"detail": "<one line>"}``: 400 an empty upload or a file that is not an
image, 413 a body or image above the upload cap (checked while the body arrives, before it is parsed),
415 a body that is not multipart/form-data, 422 no ``image`` field or an invalid ``top_k``.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mpafer.errors import ConfigError

if TYPE_CHECKING:
    from mpafer.train.predict import LoadedRun

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "create_app", "serve_model"]

#: Default cap on an uploaded image (10 MiB: far above any face crop, far below what hurts the server).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Room for the multipart envelope (boundaries, part headers) around the image in the body cap.
_ENVELOPE_BYTES = 64 * 1024
#: An oversized body is read and dropped up to this many times the cap, so that the client gets its 413;
#: beyond that the connection is closed.
_DRAIN_FACTOR = 8
FIELD = "image"


def _too_large(limit: int) -> str:
    return f"upload too large: the limit is {limit:,} bytes (mpafer serve-model --max-upload-mb)"


class _BodyLimit:
    """ASGI middleware: refuse a body above ``limit`` bytes (declared or counted while it arrives) with 413."""

    def __init__(self, app: Any, limit: int, image_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.image_limit = image_limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._drain(receive)
            await JSONResponse({"detail": _too_large(self.image_limit)}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(status_code=413, detail=_too_large(self.image_limit))
            return message

        await self.app(scope, counted, send)

    async def _drain(self, receive: Any) -> None:
        dropped = 0
        while dropped <= _DRAIN_FACTOR * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _safe_filename(name: str | None) -> str:
    base = Path(name or "upload").name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:100] or "upload"


def create_app(run: LoadedRun, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, top_k: int = 3) -> FastAPI:
    """The FastAPI application serving ``run`` (see the module docstring)."""
    from fastapi.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    from mpafer import __version__
    from mpafer.train.predict import predict_loaded

    if max_upload_bytes < 1:
        raise ConfigError(f"the upload cap must be positive, got {max_upload_bytes} bytes")
    default_k = top_k
    run.text_features()  # once, before the first request
    lock = threading.Lock()  # one forward at a time: the model and its buffers are shared
    app = FastAPI(title="mpafer prediction server", version=__version__,
                  description="Facial expression recognition with MPA-FER prompts on a frozen CLIP.")
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + _ENVELOPE_BYTES, image_limit=max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default is a list of pydantic records; one line says the same to a person and a script.
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "variant": run.cfg.model.variant, "classes": len(run.classes),
                "weights_identity": str(run.backbone.identity), "device": str(run.device),
                "max_upload_bytes": max_upload_bytes}

    @app.get("/classes")
    def classes() -> dict[str, Any]:
        return {"classes": list(run.classes)}

    def classify(data: bytes, filename: str, k: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="mpafer-upload-") as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            with lock:
                pred = predict_loaded(run, [path], top_k=k)[0]
            if pred.error is not None:
                message = pred.error.replace(str(path), filename).replace(tmp + os.sep, "")
                raise HTTPException(status_code=400, detail=f"not an image: {message}")
        record = pred.to_dict()
        record.pop("path", None)
        return {"filename": filename, **record}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(default_k, ge=1, le=1000)) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(status_code=415, detail=(
                f"send the image as multipart/form-data in the field '{FIELD}' "
                f"(e.g. curl -F {FIELD}=@face.jpg), not {content_type or 'no content type'}"))
        form = await request.form(max_files=4, max_fields=16)
        try:
            upload = form.get(FIELD)
            if upload is None:
                raise HTTPException(status_code=422, detail=(
                    f"no form field '{FIELD}' (fields received: {sorted(form.keys()) or 'none'})"))
            if not isinstance(upload, UploadFile):
                raise HTTPException(status_code=422, detail=(
                    f"the form field '{FIELD}' holds text, not a file (e.g. curl -F {FIELD}=@face.jpg)"))
            data = await upload.read(max_upload_bytes + 1)
            filename = _safe_filename(upload.filename)
        finally:
            await form.close()
        if not data:
            raise HTTPException(status_code=400, detail=f"the uploaded file '{filename}' is empty")
        if len(data) > max_upload_bytes:
            raise HTTPException(status_code=413, detail=_too_large(max_upload_bytes))
        return await run_in_threadpool(classify, data, filename, min(top_k, len(run.classes)))

    return app


def check_port(host: str, port: int) -> None:
    """Raise :class:`ConfigError` (one line) when ``host:port`` cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                              "or --host") from None


def serve_model(run_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
                max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, top_k: int = 3,
                device: str | None = None, log_level: str = "info") -> None:
    """Load ``run_dir`` (a run or an exported folder) and serve it until interrupted."""
    import uvicorn

    from mpafer.train.predict import load_run

    check_port(host, port)
    app = create_app(load_run(run_dir, device=device), max_upload_bytes=max_upload_bytes, top_k=top_k)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
