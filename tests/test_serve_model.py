"""``mpafer serve-model``: the HTTP prediction server, tested with a real HTTP client (httpx) against uvicorn
on 127.0.0.1 on a free port: predictions equal to ``predict``, the upload cap, 4xx with one-line messages."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from train_fixtures import CLASSES, base_config, run_train, shared_inputs

from mpafer.errors import ConfigError
from mpafer.train import predict
from mpafer.train.predict import load_run

CAP = 32 * 1024  # a small upload cap, so that "too large" needs only a small body


class Served:
    def __init__(self, app: object) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.port = port

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "run"
    run_train(base_config(epochs=1), shared_inputs(), path)
    return path


@pytest.fixture(scope="module")
def served(run_dir: Path) -> Iterator[Served]:
    from mpafer.serve import create_app

    server = Served(create_app(load_run(run_dir), max_upload_bytes=CAP, top_k=3))
    yield server
    server.stop()


@pytest.fixture()
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        yield c


def _image(cls: str = "happiness", i: int = 0) -> Path:
    return shared_inputs().root / "test" / cls / f"{i:03d}.png"


def _detail(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def test_health_and_classes(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "variant": "mpa", "classes": 3, "weights_identity": "random",
                             "device": "cpu", "max_upload_bytes": CAP}
    assert client.get("/classes").json() == {"classes": CLASSES}


def test_predict_equals_the_cli_prediction(client: httpx.Client, run_dir: Path) -> None:
    images = [_image(c, i) for c in CLASSES for i in range(2)]
    expected = predict(run_dir, images, top_k=3)
    for path, want in zip(images, expected, strict=True):
        r = client.post("/predict", files={"image": (path.name, path.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["filename"] == path.name and body["label"] == want.label
        assert [t["label"] for t in body["top"]] == [c for c, _ in want.top]
        assert [t["probability"] for t in body["top"]] == pytest.approx([p for _, p in want.top], abs=1e-6)
    r = client.post("/predict", params={"top_k": 1}, files={"image": ("a.png", images[0].read_bytes())})
    assert len(r.json()["top"]) == 1
    r = client.post("/predict", params={"top_k": 50}, files={"image": ("a.png", images[0].read_bytes())})
    assert len(r.json()["top"]) == len(CLASSES)  # clamped to the classes there are


def test_bad_uploads_get_4xx_with_a_clear_message(client: httpx.Client) -> None:
    r = client.post("/predict", files={"image": ("notes.txt", b"not a face at all", "text/plain")})
    assert r.status_code == 400 and _detail(r).startswith("not an image: cannot read image notes.txt")
    assert "mpafer-upload-" not in r.text  # no server-side temporary path in the answer
    r = client.post("/predict", files={"image": ("empty.png", b"", "image/png")})
    assert r.status_code == 400 and "'empty.png' is empty" in _detail(r)
    r = client.post("/predict", files={"photo": ("a.png", _image().read_bytes())})
    assert r.status_code == 422 and "no form field 'image'" in _detail(r) and "photo" in _detail(r)
    r = client.post("/predict", files={"image": (None, b"face.png")})  # a multipart text field
    assert r.status_code == 422 and "holds text, not a file" in _detail(r)
    r = client.post("/predict", data={"image": "face.png"})  # a URL-encoded form
    assert r.status_code == 415 and "multipart/form-data" in _detail(r)
    r = client.post("/predict", content=_image().read_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in _detail(r)
    r = client.post("/predict", params={"top_k": 0}, files={"image": ("a.png", _image().read_bytes())})
    assert r.status_code == 422 and "top_k" in _detail(r)
    assert client.get("/health").status_code == 200  # still serving


def test_upload_cap_declared_and_streamed(client: httpx.Client) -> None:
    big = bytes(range(256)) * (4 * CAP // 256)
    r = client.post("/predict", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and f"{CAP:,} bytes" in _detail(r)

    # No Content-Length: a chunked body is counted while it arrives and cut at the cap.
    boundary = "mpaferboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]
        yield tail

    r = client.post("/predict", content=chunks(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "upload too large" in _detail(r)

    # Just over the cap but within the multipart envelope allowance: refused after parsing.
    r = client.post("/predict", files={"image": ("edge.png", big[: CAP + 1], "image/png")})
    assert r.status_code == 413
    assert client.get("/health").status_code == 200


def test_an_exported_folder_is_served_the_same(run_dir: Path, tmp_path: Path, served: Served) -> None:
    from mpafer.serve import create_app
    from mpafer.train.export import export_run

    out = tmp_path / "exported"
    export_run(run_dir, out)
    other = Served(create_app(load_run(out), max_upload_bytes=CAP))
    try:
        files = {"image": ("x.png", _image("sadness", 1).read_bytes())}
        with httpx.Client(timeout=60) as c:
            a = c.post(f"{served.url}/predict", files=files).json()
            b = c.post(f"{other.url}/predict", files=files).json()
        assert a["label"] == b["label"]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-6)
    finally:
        other.stop()


def test_port_in_use_and_bad_run_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpafer.cli import main
    from mpafer.serve import check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
    code = main(["serve-model", "--run", str(tmp_path / "no-run"), "--port", str(port)])
    assert code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no-run" in err[0]


def test_deprecated_serve_alias_still_serves_deployments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`mpafer serve` is the old name of serve-deployments: it warns, then behaves the same (here: the
    config is validated before Prefect starts, so a missing config is one error line)."""
    from mpafer.cli import main

    missing = str(tmp_path / "missing.yaml")
    assert main(["serve", "--config", missing]) == main(["serve-deployments", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert "`mpafer serve` is deprecated" in err and err.count("error:") == 2 and "missing.yaml" in err


def test_body_cap_stops_reading_at_the_limit() -> None:
    """The cap is enforced while the body arrives: the application never gets more than the limit (plus the
    chunk that crossed it), and a declared oversized body never reaches the application."""
    import asyncio

    from mpafer.serve import _BodyLimit

    inner = FastAPI()
    calls: list[int] = []

    @inner.post("/")
    async def read_all(request: Request) -> dict[str, int]:
        calls.append(1)
        return {"n": len(await request.body())}

    limit, chunk = 10_000, 1_000
    app = _BodyLimit(inner, limit=limit, image_limit=limit)

    def exchange(n_chunks: int, declared: int | None) -> tuple[int, int]:
        sent = {"n": 0}
        status: list[int] = []

        async def receive() -> dict[str, object]:
            sent["n"] += 1
            return {"type": "http.request", "body": b"x" * chunk, "more_body": sent["n"] < n_chunks}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))  # type: ignore[arg-type]

        headers = [(b"content-length", str(declared).encode())] if declared is not None else []
        scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"",
                 "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("t", 80),
                 "client": ("c", 1), "root_path": ""}
        asyncio.run(app(scope, receive, send))
        return status[0], sent["n"]

    assert exchange(5, None) == (200, 5) and calls == [1]
    status, read = exchange(1000, None)  # 1 MB streamed without a length
    assert status == 413 and read == limit // chunk + 1
    calls.clear()
    status, read = exchange(30, 30 * chunk)  # declared too large: refused before the application runs
    assert status == 413 and not calls and read == 30  # the rest was drained so that the client hears 413
