"""A scriptable OpenAI-compatible chat-completions server for tests (stdlib only, 127.0.0.1, free port).

``POST /v1/chat/completions`` answers valid chat-completion JSON. The class a request is about is the
first canonical class name found in its first user message. Behaviours are scripted with
:meth:`FakeLLMServer.plan`; the first matching rule with uses left decides the answer, the default is
``ok``:

- ``ok``: ``{"descriptions": [...]}`` (structured when the request carries a json_schema response format)
- ``rate_limit``: HTTP 429 (``retry-after-ms: 1``), ``server_error``: HTTP 500 (``retry-after-ms: 1``)
- ``slow``: sleeps ``slow_s`` seconds, then answers ``ok`` (beyond the client's timeout)
- ``length``: finish_reason ``length`` with a cut-off JSON text
- ``invalid_json``: prose instead of JSON
- ``refusal``: ``message.refusal`` set, no content
- ``reject_json_schema``: HTTP 400 for requests with a json_schema response format (others answer ok)
- ``unauthorized``: HTTP 401
- ``long``: descriptions too long for CLIP's 77 tokens
- ``duplicates``: descriptions with case-variant duplicates and empty items
- ``too_few``: one description (of the class) where five were asked
- ``placeholder``: the same single placeholder description for every class (a degenerate test server)
- ``unavailable``: HTTP 503 with ``retry-after: <retry_after_s>`` (seconds, as the header allows)
- ``html``, ``not_chat``, ``null``: HTTP 200 that is not a chat completion: a web UI's HTML page,
  ``{"foo": 1}``, JSON ``null``
- ``trickle``: a valid answer sent one byte every ``trickle_s`` seconds (defeats per-read timeouts)
- ``raw``: the status, content type and body in :attr:`FakeLLMServer.raw_reply` (fuzzing)

Every request is recorded (model, class, first user message, response format, Authorization header).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLASSES = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
BEHAVIOURS = (
    "ok",
    "rate_limit",
    "server_error",
    "slow",
    "length",
    "invalid_json",
    "refusal",
    "reject_json_schema",
    "unauthorized",
    "long",
    "duplicates",
    "too_few",
    "placeholder",
    "unavailable",
    "html",
    "not_chat",
    "null",
    "trickle",
    "raw",
)
#: Bodies of the behaviours that answer 200 with something that is not a chat completion.
NOT_CHAT = {
    "html": ("text/html; charset=utf-8", b"<!doctype html><html><head><title>Open WebUI</title></head></html>"),
    "not_chat": ("application/json", b'{"foo": 1}'),
    "null": ("application/json", b"null"),
}


@dataclass
class Rule:
    behaviour: str
    model: str | None = None
    class_name: str | None = None
    times: int | None = None  # None = forever


@dataclass
class Recorded:
    model: str
    class_name: str | None
    question: str
    response_format: str | None
    schema_name: str | None
    authorization: str | None
    behaviour: str
    body: dict[str, Any] = field(repr=False, default_factory=dict)
    #: ``time.monotonic()`` when the request arrived (to check the pauses between retries).
    at: float = field(default_factory=time.monotonic)


class FakeLLMServer:
    """Start with :meth:`start` (or as a context manager); ``url`` is the OpenAI-style base URL."""

    def __init__(self, slow_s: float = 1.0, trickle_s: float = 1.0, retry_after_s: int = 1) -> None:
        self.slow_s = slow_s
        self.trickle_s = trickle_s
        self.retry_after_s = retry_after_s
        #: ``(status, content type, body)`` sent by the ``raw`` behaviour.
        self.raw_reply: tuple[int, str, bytes] = (200, "application/json", b"{}")
        self.rules: list[Rule] = []
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------------
    def plan(
        self,
        behaviour: str,
        *,
        model: str | None = None,
        class_name: str | None = None,
        times: int | None = None,
    ) -> None:
        """Add a rule: requests matching ``model``/``class_name`` get ``behaviour`` (``times`` uses)."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        with self._lock:
            self.rules.append(Rule(behaviour, model, class_name, times))

    def reset(self) -> None:
        """Forget rules and recorded requests."""
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def counts(self, model: str | None = None) -> Counter[str | None]:
        """Requests per class (optionally only for ``model``)."""
        with self._lock:
            return Counter(r.class_name for r in self.requests if model is None or r.model == model)

    def count(
        self, model: str | None = None, class_name: str | None = None, question: str | None = None
    ) -> int:
        """Number of requests matching all given filters (``question`` is a substring of the user message)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (model is None or r.model == model)
                and (class_name is None or r.class_name == class_name)
                and (question is None or question in r.question)
            )

    @property
    def authorizations(self) -> set[str | None]:
        with self._lock:
            return {r.authorization for r in self.requests}

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLLMServer:
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour ----------------------------------------------------------------------------------
    def _choose(self, model: str, class_name: str | None) -> str:
        with self._lock:
            for rule in self.rules:
                if rule.model not in (None, model) or rule.class_name not in (None, class_name):
                    continue
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                return rule.behaviour
        return "ok"

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)


def descriptions_for(model: str, class_name: str | None, behaviour: str = "ok", n: int = 5) -> list[str]:
    """The deterministic descriptions the server answers with."""
    c = class_name or "unknown"
    if behaviour == "long":
        filler = " ".join(f"very detailed feature number {i} of the {c} face" for i in range(12))
        return [f"{filler} variant {j}" for j in range(2)]
    if behaviour == "duplicates":
        return [f"Brows raised for {c}.", f"  brows RAISED for {c}  ", "", "   ", f"- mouth open for {c}"]
    if behaviour == "too_few":
        return [f"{model} only feature of {c}"]
    if behaviour == "placeholder":
        return ["This is a placeholder description."]
    return [f"{model} visible feature {i} of {c}: brows, eyes and mouth shape" for i in range(1, n + 1)]


def _first_user_message(messages: list[dict[str, Any]]) -> str:
    for m in messages:
        if m.get("role") == "user":
            content = m.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def _class_of(text: str) -> str | None:
    hits = [(text.find(c), c) for c in CLASSES if c in text]
    return min(hits)[1] if hits else None


def _make_handler(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _send(
            self,
            status: int,
            payload: Any,
            headers: dict[str, str] | None = None,
            content_type: str = "application/json",
            trickle_s: float = 0.0,
        ) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not trickle_s:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):  # one byte at a time: every read returns quickly
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(trickle_s)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def _error(
            self,
            status: int,
            message: str,
            etype: str,
            param: str | None = None,
            headers: dict[str, str] | None = None,
        ) -> None:
            self._send(
                status, {"error": {"message": message, "type": etype, "param": param, "code": None}}, headers
            )

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "not_found")
                return
            model = str(body.get("model", ""))
            messages = body.get("messages") or []
            question = _first_user_message(messages)
            class_name = _class_of(question)
            rf = body.get("response_format") or None
            rf_type = rf.get("type") if isinstance(rf, dict) else None
            schema_name = rf.get("json_schema", {}).get("name") if rf_type == "json_schema" else None
            behaviour = server._choose(model, class_name)
            server._record(
                Recorded(
                    model,
                    class_name,
                    question,
                    rf_type,
                    schema_name,
                    self.headers.get("authorization"),
                    behaviour,
                    body,
                )
            )
            retry_fast = {"retry-after-ms": "1"}
            if behaviour == "unauthorized":
                key = (self.headers.get("authorization") or "").removeprefix("Bearer ")
                self._error(
                    401,
                    f"Incorrect API key provided: {key}.",
                    "invalid_request_error",
                    None,
                    {"x-should-retry": "false"},
                )
                return
            if behaviour == "rate_limit":
                self._error(429, "Rate limit reached for requests", "requests", None, retry_fast)
                return
            if behaviour == "server_error":
                self._error(
                    500,
                    "The server had an error while processing your request.",
                    "server_error",
                    None,
                    retry_fast,
                )
                return
            if behaviour == "unavailable":
                self._error(503, "The server is overloaded.", "server_error", None,
                            {"retry-after": str(server.retry_after_s)})
                return
            if behaviour == "raw":
                status, content_type, data = server.raw_reply
                self._send(status, data, content_type=content_type)
                return
            if behaviour in NOT_CHAT:
                content_type, data = NOT_CHAT[behaviour]
                self._send(200, data, content_type=content_type)
                return
            if behaviour == "reject_json_schema" and rf_type == "json_schema":
                self._error(
                    400,
                    "response_format of type json_schema is not supported by this model",
                    "invalid_request_error",
                    "response_format",
                )
                return
            if behaviour == "slow":
                time.sleep(server.slow_s)
            finish = "stop"
            refusal = None
            content: str | None = json.dumps({"descriptions": descriptions_for(model, class_name, behaviour)})
            if behaviour == "length":
                content, finish = content[: len(content) // 2], "length"
            elif behaviour == "invalid_json":
                content = "Sure! Here are some features: raised brows, open mouth."
            elif behaviour == "refusal":
                content, refusal = None, "I'm sorry, I can't help with that."
            self._send(
                200,
                {
                    "id": f"chatcmpl-{len(server.requests)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content, "refusal": refusal},
                            "finish_reason": finish,
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
                },
                trickle_s=server.trickle_s if behaviour == "trickle" else 0.0,
            )

    return Handler
