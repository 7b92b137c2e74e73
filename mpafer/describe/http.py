"""The HTTP client under the ``openai`` client: a total deadline per request, a size cap on answers, and a
check that a chat-completions answer is one before the ``openai`` package parses it.

``httpx``'s timeouts bound each network operation (connect, one read), not a request: a server that
trickles one byte a second never trips a 60-second read timeout and keeps ``describe`` waiting forever.
:class:`GuardedHttpClient` runs every send (one attempt; the ``openai`` client's retries and their
``Retry-After`` handling sit above it) in a daemon thread and gives up after ``deadline_s`` with
``httpx.ReadTimeout``, which the ``openai`` client treats as any timeout (retried, then
``APITimeoutError``). An abandoned attempt ends on its own at its next read timeout; being a daemon
thread, it never keeps the process alive.

A 2xx answer to ``.../chat/completions`` must be a JSON object with a ``choices`` list of objects that
each hold a ``message`` object. Anything else (a web UI's HTML page, ``{"foo": 1}``, ``null``) raises
:class:`NotChatAPIError`, an ``openai.OpenAIError``, which the ``openai`` client passes on without
retrying; the describe client turns it into one line naming the URL.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx2
import openai

#: Largest answer read from an LLM server (a chat completion is a few kB; more is not a chat API).
MAX_ANSWER_BYTES = 8 << 20


class NotChatAPIError(openai.OpenAIError):
    """The server answered, but not as an OpenAI-compatible chat-completions API. ``what`` says what came."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _snippet(body: bytes, limit: int = 80) -> str:
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def chat_answer_problem(content_type: str, body: bytes) -> str | None:
    """Why ``body`` is not a chat-completions answer (``None`` when it is one)."""
    kind = content_type.split(";")[0].strip() or "no content type"
    try:
        data = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return f"a {kind} answer that is not JSON: {_snippet(body)}"
    if not isinstance(data, dict):
        return f"JSON {type(data).__name__ if data is not None else 'null'} instead of a chat completion object"
    choices = data.get("choices")
    if not isinstance(choices, list):
        return f"a JSON object without a 'choices' list: {_snippet(body)}"
    if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        return "a 'choices' list whose items hold no 'message' object"
    return None


class GuardedHttpClient(openai.DefaultHttpxClient):
    """``openai``'s default HTTP client with a total deadline per send, a size cap and the chat-answer check."""

    def __init__(self, *, deadline_s: float, max_bytes: int = MAX_ANSWER_BYTES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deadline_s = float(deadline_s)
        self.max_bytes = int(max_bytes)

    def _send_whole(self, request: httpx2.Request, kwargs: dict[str, Any]) -> tuple[httpx2.Response, bytes]:
        response = super().send(request, **{**kwargs, "stream": True})
        try:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise NotChatAPIError(f"an answer larger than {self.max_bytes >> 20} MiB")
                chunks.append(chunk)
        finally:
            response.close()
        return response, b"".join(chunks)

    def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:  # type: ignore[override]
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = self._send_whole(request, kwargs)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=work, name="mpafer-llm-request", daemon=True)
        worker.start()
        worker.join(self.deadline_s)
        if worker.is_alive():
            raise httpx2.ReadTimeout(f"no complete answer within {self.deadline_s:g} s", request=request)
        if "error" in box:
            raise box["error"]
        streamed, body = box["result"]
        if 200 <= streamed.status_code < 300 and request.url.path.rstrip("/").endswith("/chat/completions"):
            problem = chat_answer_problem(streamed.headers.get("content-type", ""), body)
            if problem:
                raise NotChatAPIError(problem)
        # The body is decoded already: drop the headers that describe the encoded one.
        headers = [(k, v) for k, v in streamed.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        response = httpx2.Response(streamed.status_code, headers=headers, content=body, request=request,
                                   extensions=streamed.extensions)
        response.elapsed = streamed.elapsed
        return response
