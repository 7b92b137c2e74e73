"""The LLM client: the ``openai`` package against OpenAI, Azure OpenAI or any OpenAI-compatible server.

Structured output goes through ``client.chat.completions.parse(response_format=LLMAnswer)`` (a JSON
schema). A server that rejects ``json_schema`` (HTTP 400 naming response_format/json_schema) is asked
again with a JSON-only system instruction, its reply parsed with ``json.loads`` and validated by the same
pydantic model, re-asking up to ``max_reasks`` times with the validation error. Transient failures
(429, 5xx, timeouts, connection errors) are retried by the client itself, ``max_retries`` times, honouring
``Retry-After``. Under it, :class:`~mpafer.describe.http.GuardedHttpClient` bounds each request as a whole
by ``timeout_s`` and refuses answers that are not chat completions. The key is sent only where the operator
allows (:mod:`mpafer.describe.keys`). Every failure becomes one :class:`LLMError` line that never contains
the API key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import openai
import pydantic
from openai import OpenAI

from mpafer.config import LLMConfig
from mpafer.describe.http import GuardedHttpClient, NotChatAPIError
from mpafer.describe.keys import KEYS_ENV, key_variable
from mpafer.describe.schema import LLMAnswer
from mpafer.errors import LLMError

Mode = Literal["json_schema", "json"]

#: The base URL used when ``llm.base_url`` is unset.
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Sent as the key to servers that need none (Ollama, vLLM or LM Studio without ``--api-key``).
DUMMY_API_KEY = "not-needed"

JSON_INSTRUCTION = (
    "Reply with one JSON object and nothing else: no prose, no markdown, no code fences. "
    'It must have exactly one key, "descriptions", whose value is a list of strings. '
    "It must match this JSON schema: {schema}"
)
REASK_INSTRUCTION = (
    "Your previous reply was not usable: {error}. Reply again with only the JSON object "
    '{{"descriptions": ["...", "..."]}} and nothing else.'
)

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*(.*?)\s*```\s*$", re.DOTALL)


# ---------------------------------------------------------------------------------------------- URLs
def effective_base_url(llm: LLMConfig) -> str:
    """``llm.base_url`` or OpenAI's public endpoint."""
    return (llm.base_url or OPENAI_BASE_URL).strip()


def server_host(url: str) -> str:
    """``host[:port]`` of a URL: no scheme, user info, path or query (safe to record and hash)."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def display_url(url: str) -> str:
    """The URL without user info, query or fragment (for messages)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return server_host(url)
    return f"{parts.scheme}://{server_host(url)}{parts.path}"


def needs_api_key(url: str) -> bool:
    """True for OpenAI's and Azure OpenAI's hosts, which always require a key."""
    host = server_host(url).split(":")[0]
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def _uses_max_completion_tokens(url: str) -> bool:
    # OpenAI and Azure accept ``max_completion_tokens`` for every chat model (reasoning models reject
    # ``max_tokens``); other OpenAI-compatible servers reliably understand ``max_tokens``.
    return needs_api_key(url)


def resolve_api_key(llm: LLMConfig) -> tuple[str, str | None]:
    """``(key, variable)``: the key from the variable the operator allows for the server's host
    (:mod:`mpafer.describe.keys`), or a placeholder and ``None`` when no key may or need be sent.

    Raises :class:`ConfigError` when the run names a variable the operator does not allow for that host,
    :class:`LLMError` when OpenAI's or Azure's host gets no key.
    """
    url = effective_base_url(llm)
    variable = key_variable(url, llm.api_key_env)
    key = os.environ.get(variable, "").strip() if variable else ""
    if key:
        return key, variable
    if needs_api_key(url):
        if variable is None:
            raise LLMError(
                f"no API key may be sent to {display_url(url)}: the operator allows no variable for this host "
                f"({KEYS_ENV}), or llm.api_key_env is none"
            )
        raise LLMError(
            f"the environment variable {variable} is not set; it must hold the API key for "
            f"{display_url(url)} (or choose another variable with llm.api_key_env / --api-key-env)"
        )
    return DUMMY_API_KEY, variable


# ------------------------------------------------------------------------------------------- parsing
def answer_schema() -> dict[str, Any]:
    """The JSON schema of :class:`LLMAnswer` (part of every cache key)."""
    return LLMAnswer.model_json_schema()


def parse_json_answer(content: str) -> LLMAnswer:
    """``json.loads`` a reply (tolerating a surrounding code fence) and validate it as :class:`LLMAnswer`.

    Raises ``ValueError`` (including pydantic's ``ValidationError``) with a short reason.
    """
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    if not text:
        raise ValueError("the reply was empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    return LLMAnswer.model_validate(data)


def _short_validation_error(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return "it is not valid JSON"
        loc = ".".join(str(x) for x in first["loc"]) or "reply"
        return f"{loc}: {first['msg']}"
    return str(exc)


def _rejects_json_schema(exc: openai.BadRequestError) -> bool:
    text = f"{exc.message} {exc.param or ''} {json.dumps(exc.body, default=str) if exc.body else ''}".lower()
    return "response_format" in text or "json_schema" in text or "json schema" in text


# -------------------------------------------------------------------------------------------- client
class DescriptionClient:
    """Asks one OpenAI-compatible server for descriptions, with structured output and clear errors."""

    def __init__(self, llm: LLMConfig, *, openai_client: OpenAI | None = None) -> None:
        self.llm = llm
        self.base_url = effective_base_url(llm)
        self.host = server_host(self.base_url)
        self._api_key: str | None = None
        #: The environment variable the key came from (``None``: no key is sent).
        self.key_env: str | None = None
        self._client_override = openai_client
        self._openai_client: OpenAI | None = None
        #: Requests sent (fallbacks and re-asks included; the client's own transient retries are not).
        self.n_requests = 0
        #: ``False`` once the server rejected json_schema; later requests go straight to JSON mode.
        self.schema_supported: bool | None = (
            None if llm.response_format == "auto" else (llm.response_format == "json_schema")
        )

    @property
    def _client(self) -> OpenAI:
        """The ``openai`` client, created (and the API key resolved) on the first request."""
        if self._openai_client is None:
            self._api_key, self.key_env = resolve_api_key(self.llm)
            self._openai_client = self._client_override or OpenAI(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=self.llm.timeout_s,
                max_retries=self.llm.max_retries,
                http_client=GuardedHttpClient(deadline_s=self.llm.timeout_s),
            )
        return self._openai_client

    # -- what a request looks like (cache keys and provenance use these) -------------------------------
    def modes(self) -> list[Mode]:
        """Response modes this configuration may use, in order of preference."""
        if self.llm.response_format == "json":
            return ["json"]
        if self.llm.response_format == "json_schema" or not self.llm.allow_fallback:
            return ["json_schema"]
        return ["json_schema", "json"]

    def parameters(self, mode: Mode) -> dict[str, Any]:
        """Everything besides model and messages that shapes the answer."""
        return {
            "temperature": self.llm.temperature,
            "seed": self.llm.seed,
            "max_tokens": self.llm.max_tokens,
            "response_format": mode,
        }

    @staticmethod
    def messages_for_mode(messages: list[dict[str, str]], mode: Mode) -> list[dict[str, str]]:
        """``messages`` as sent in ``mode``: JSON mode prepends the JSON-only system instruction."""
        if mode == "json_schema":
            return list(messages)
        schema = json.dumps(answer_schema(), sort_keys=True)
        return [{"role": "system", "content": JSON_INSTRUCTION.format(schema=schema)}, *messages]

    # -- asking -----------------------------------------------------------------------------------------
    def ask(self, messages: list[dict[str, str]], label: str) -> tuple[LLMAnswer, Mode]:
        """Send ``messages`` and return the validated answer and the mode that produced it.

        ``label`` names the request in error messages (e.g. ``class 'fear'``).
        """
        _ = self._client  # resolve the API key before anything counts as sent
        if self.schema_supported is False or self.modes() == ["json"]:
            return self._ask_json(messages, label), "json"
        answer = self._ask_schema(messages, label)
        if answer is None:  # rejected json_schema, fallback allowed
            return self._ask_json(messages, label), "json"
        return answer, "json_schema"

    def _common_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.llm.model, "temperature": self.llm.temperature}
        if self.llm.seed is not None:
            kwargs["seed"] = self.llm.seed
        token_field = "max_completion_tokens" if _uses_max_completion_tokens(self.base_url) else "max_tokens"
        kwargs[token_field] = self.llm.max_tokens
        return kwargs

    def _ask_schema(self, messages: list[dict[str, str]], label: str) -> LLMAnswer | None:
        convo = self.messages_for_mode(messages, "json_schema")
        problem = ""
        for _attempt in range(self.llm.max_reasks + 1):
            self.n_requests += 1
            try:
                with self._translate(label, schema_request=True):
                    completion = self._client.chat.completions.parse(
                        messages=convo, response_format=LLMAnswer, **self._common_kwargs()
                    )
            except _SchemaRejected as rejected:
                if self.llm.response_format == "auto" and self.llm.allow_fallback:
                    self.schema_supported = False
                    return None
                raise LLMError(
                    f"the LLM server at {display_url(self.base_url)} rejects json_schema structured output "
                    f"({rejected.reason}); set llm.response_format=json, or llm.response_format=auto with "
                    "llm.allow_fallback=true"
                ) from None
            except pydantic.ValidationError as exc:
                problem = _short_validation_error(exc)
                convo = [*convo, {"role": "user", "content": REASK_INSTRUCTION.format(error=problem)}]
                continue
            self.schema_supported = True
            message = self._first_message(completion, label)
            if message.refusal:
                raise self._refusal(message.refusal, label)
            if message.parsed is not None:
                return message.parsed
            problem = "the reply was empty"
            convo = [*convo, {"role": "user", "content": REASK_INSTRUCTION.format(error=problem)}]
        raise self._invalid(problem, label)

    def _ask_json(self, messages: list[dict[str, str]], label: str) -> LLMAnswer:
        convo = self.messages_for_mode(messages, "json")
        problem = ""
        for _attempt in range(self.llm.max_reasks + 1):
            self.n_requests += 1
            with self._translate(label):
                completion = self._client.chat.completions.create(messages=convo, **self._common_kwargs())
            choice = completion.choices[0] if completion.choices else None
            if choice is None:
                raise LLMError(
                    f"the LLM server at {display_url(self.base_url)} returned no choices for {label}"
                )
            if choice.finish_reason == "length":
                raise self._truncated(label)
            if choice.finish_reason == "content_filter":
                raise self._filtered(label)
            if choice.message.refusal:
                raise self._refusal(choice.message.refusal, label)
            content = choice.message.content or ""
            try:
                return parse_json_answer(content)
            except ValueError as exc:
                problem = _short_validation_error(exc)
            convo = [
                *convo,
                {"role": "assistant", "content": content},
                {"role": "user", "content": REASK_INSTRUCTION.format(error=problem)},
            ]
        raise self._invalid(problem, label)

    # -- errors -----------------------------------------------------------------------------------------
    def _first_message(self, completion: Any, label: str) -> Any:
        if not completion.choices:
            raise LLMError(f"the LLM server at {display_url(self.base_url)} returned no choices for {label}")
        return completion.choices[0].message

    def _redact(self, text: str) -> str:
        text = " ".join(str(text).split())
        if self._api_key and self._api_key != DUMMY_API_KEY:
            text = text.replace(self._api_key, "***")
        return text[:300]

    def _server_message(self, exc: openai.APIError) -> str:
        """The server's own error message (without the client's ``Error code: N -`` prefix), redacted."""
        body = exc.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict) and isinstance(inner.get("message"), str):
                return self._redact(inner["message"])
        return self._redact(re.sub(r"^Error code: \d+ - ", "", exc.message))

    def _truncated(self, label: str) -> LLMError:
        return LLMError(
            f"the answer for {label} from model {self.llm.model!r} was cut off at llm.max_tokens="
            f"{self.llm.max_tokens} (finish_reason 'length'); raise llm.max_tokens"
        )

    def _filtered(self, label: str) -> LLMError:
        return LLMError(
            f"the content filter of {display_url(self.base_url)} blocked the answer for {label} "
            "(finish_reason 'content_filter')"
        )

    def _refusal(self, refusal: str, label: str) -> LLMError:
        return LLMError(f"model {self.llm.model!r} refused to describe {label}: {self._redact(refusal)}")

    def _invalid(self, problem: str, label: str) -> LLMError:
        return LLMError(
            f"model {self.llm.model!r} gave no valid JSON answer for {label} after {self.llm.max_reasks} "
            f"re-asks (last problem: {self._redact(problem)})"
        )

    @contextmanager
    def _translate(self, label: str, *, schema_request: bool = False) -> Iterator[None]:
        """Turn the ``openai`` exceptions of one request into one-line :class:`LLMError`s.

        With ``schema_request``, a 400 that names response_format/json_schema raises the internal
        ``_SchemaRejected`` instead, so that the caller can fall back to JSON mode.
        """
        url = display_url(self.base_url)
        llm = self.llm
        retries = llm.max_retries
        tries = (
            f"after {retries} {'retry' if retries == 1 else 'retries'}"
            if retries
            else "with retries disabled"
        )
        try:
            yield
        except openai.LengthFinishReasonError:
            raise self._truncated(label) from None
        except openai.ContentFilterFinishReasonError:
            raise self._filtered(label) from None
        except NotChatAPIError as exc:
            raise LLMError(
                f"the server at {url} did not answer as an OpenAI-compatible chat-completions API (it sent "
                f"{self._redact(exc.what)}); check llm.base_url (the API's base URL, usually ending in /v1)"
            ) from None
        except openai.AuthenticationError as exc:
            if self.key_env is None:
                key_state = (
                    f"no key was sent: the operator allows none for this host ({KEYS_ENV}, docs/LLM.md)"
                )
            elif self._api_key in (None, DUMMY_API_KEY):
                key_state = f"the environment variable {self.key_env} is not set"
            else:
                key_state = f"the environment variable {self.key_env} holds a key the server rejected"
            raise LLMError(
                f"the LLM server at {url} refused the API key (HTTP 401: {self._server_message(exc)}); "
                f"{key_state}"
            ) from None
        except openai.PermissionDeniedError as exc:
            raise LLMError(
                f"the LLM server at {url} denied access to model {llm.model!r} (HTTP 403: "
                f"{self._server_message(exc)}); check the key in {self.key_env or 'the environment'}"
            ) from None
        except openai.NotFoundError as exc:
            raise LLMError(
                f"the LLM server at {url} does not know model {llm.model!r} or has no chat-completions "
                f"endpoint (HTTP 404: {self._server_message(exc)})"
            ) from None
        except openai.RateLimitError as exc:
            raise LLMError(
                f"the LLM server at {url} kept rate-limiting the request for {label} (HTTP 429) {tries}: "
                f"{self._server_message(exc)}"
            ) from None
        except openai.BadRequestError as exc:
            if schema_request and _rejects_json_schema(exc):
                raise _SchemaRejected(self._server_message(exc)) from None
            raise LLMError(
                f"the LLM server at {url} rejected the request for {label} (HTTP 400: {self._server_message(exc)})"
            ) from None
        except openai.APIStatusError as exc:
            raise LLMError(
                f"the LLM server at {url} failed for {label} (HTTP {exc.status_code}) {tries}: "
                f"{self._server_message(exc)}"
            ) from None
        except openai.APITimeoutError:
            raise LLMError(
                f"the LLM server at {url} did not answer for {label} within llm.timeout_s={llm.timeout_s:g} s "
                f"({tries}); raise llm.timeout_s or check the server"
            ) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            reason = self._redact(str(cause)) if cause else self._server_message(exc)
            raise LLMError(
                f"cannot reach the LLM server at {url} ({reason}) {tries}; is it running?"
            ) from None
        except openai.OpenAIError as exc:
            raise LLMError(f"the LLM request for {label} to {url} failed: {self._redact(str(exc))}") from None

    def close(self) -> None:
        if self._openai_client is not None and self._client_override is None:
            self._openai_client.close()


class _SchemaRejected(Exception):
    """Internal: the server rejected ``response_format: json_schema``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
