"""Which API key may go to which LLM server: an operator setting, never a run parameter.

A run's config names the server (``llm.base_url``) and, optionally, the variable holding the key
(``llm.api_key_env``). Both can come from a flow-run parameter of a shared deployment, so neither may
decide where a secret goes. The environment of the process that sends the request does: the variable
:data:`KEYS_ENV` lists the variables that may be used as API keys and, for each, the hosts that may
receive it::

    MPAFER_LLM_KEYS="OPENAI_API_KEY=api.openai.com;VLLM_API_KEY=127.0.0.1:8000,localhost:8000"

Each entry is ``VARIABLE=pattern[,pattern...]``; a pattern is a host (``api.openai.com``), a host and
port (``gpu-box:8000``, ``[::1]:8000``) or a domain wildcard (``*.openai.azure.com``). A key goes over
HTTPS only, except to a loopback host (``localhost``, ``127.0.0.0/8``, ``::1``) or to a pattern written
with ``http://`` (the operator's explicit choice of plain HTTP). Unset or empty, the setting is
:data:`DEFAULT_KEYS` (OpenAI's and Azure OpenAI's hosts); set, it replaces the default entirely; ``none``
allows no key anywhere.

``llm.api_key_env``: ``auto`` (default) takes the first variable allowed for the server's host and sends
no key to any other host, so keyless local servers (Ollama, vLLM, LM Studio) work whatever keys the
environment holds; ``none`` never sends a key; a variable name is used only when the operator allows it
for that host, and refused (one line, before any request) otherwise.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from mpafer.errors import ConfigError

#: The operator's setting: which environment variables may be sent as API keys, and to which hosts.
KEYS_ENV = "MPAFER_LLM_KEYS"
#: Used when :data:`KEYS_ENV` is unset.
DEFAULT_KEYS = (
    "OPENAI_API_KEY=api.openai.com;"
    "AZURE_OPENAI_API_KEY=*.openai.azure.com,*.cognitiveservices.azure.com"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HostPattern:
    """One allowed destination of a key: ``host`` (``*.suffix`` for a domain), an optional port, and whether
    plain HTTP was explicitly allowed."""

    host: str
    port: int | None = None
    plain_http: bool = False

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if scheme != "https" and not (self.plain_http or is_loopback(host)):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{host}:{self.port}" if self.port is not None else host
        return f"http://{text}" if self.plain_http else text


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (traffic that never leaves the machine)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pattern(text: str, source: str) -> HostPattern:
    raw = text.strip()
    plain = raw.lower().startswith("http://")
    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    try:
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        host, port = "", None
    if not host or parts.path not in ("", "/") or (parts.scheme and parts.scheme not in ("http", "https")):
        raise ConfigError(f"{source}: {raw!r} is not a host, host:port or *.domain pattern")
    return HostPattern(host, port, plain)


def allowed_keys(environ: Mapping[str, str] | None = None) -> dict[str, list[HostPattern]]:
    """The operator's table: variable name -> hosts its key may be sent to (from :data:`KEYS_ENV`)."""
    env = os.environ if environ is None else environ
    raw = (env.get(KEYS_ENV) or "").strip() or None  # unset or empty: the default table
    source = f"the environment variable {KEYS_ENV}" if raw is not None else "the default key table"
    table: dict[str, list[HostPattern]] = {}
    if raw is not None and raw.lower() == "none":
        return table
    for entry in (raw if raw is not None else DEFAULT_KEYS).split(";"):
        if not entry.strip():
            continue
        name, sep, hosts = entry.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not hosts.strip():
            raise ConfigError(
                f"{source}: entry {entry.strip()!r} is not VARIABLE=host[,host...] "
                f"(e.g. {KEYS_ENV}='OPENAI_API_KEY=api.openai.com')"
            )
        table.setdefault(name, []).extend(_pattern(h, source) for h in hosts.split(",") if h.strip())
    return table


def _destination(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def key_variable(url: str, api_key_env: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The environment variable whose key may be sent to ``url`` for a run asking for ``api_key_env``;
    ``None`` = send no key. Raises :class:`ConfigError` (before any request) when the run names a variable
    the operator does not allow for that host."""
    if api_key_env == "none":
        return None
    table = allowed_keys(environ)
    scheme, host, port = _destination(url)
    where = f"{scheme}://{host}:{port}"
    if api_key_env == "auto":
        return next((name for name, pats in table.items() if any(p.matches(scheme, host, port) for p in pats)),
                    None)
    patterns = table.get(api_key_env)
    if patterns is None:
        allowed = ", ".join(table) or "none"
        raise ConfigError(
            f"llm.api_key_env={api_key_env} is not a variable the operator allows as an API key (allowed: "
            f"{allowed}; the operator sets {KEYS_ENV}); use llm.api_key_env=auto, or none for a server that "
            "needs no key"
        )
    if not any(p.matches(scheme, host, port) for p in patterns):
        raise ConfigError(
            f"refusing to send the key in {api_key_env} to {where}: the operator allows it only for "
            f"{', '.join(map(str, patterns))} ({KEYS_ENV}); use llm.api_key_env=auto (or none) for a server "
            "that needs no key"
        )
    return api_key_env
