"""Multi-granularity descriptions: ask the LLM docs/METHOD.md §2's question (plus extra questions) per class,
validate and cache the answers, and write one descriptions file when every class succeeded.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mpafer import __version__
from mpafer.artifacts import atomic_write_json, content_key, file_lock
from mpafer.config import LLMConfig
from mpafer.describe.cache import CACHE_VERSION, ResponseCache, request_key
from mpafer.describe.classes import class_set_name
from mpafer.describe.client import DescriptionClient, Mode, answer_schema
from mpafer.describe.prompts import TEMPLATES, clean_description, fine_prompt
from mpafer.describe.schema import (
    DescriptionFlag,
    Descriptions,
    LLMProvenance,
    load_descriptions,
)
from mpafer.errors import ConfigError, LLMError
from mpafer.resources import shipped_file

#: CLIP's text context length (start and end tokens included).
CLIP_CONTEXT_LENGTH = 77
#: The tokenizer used to count tokens: the standard CLIP BPE (no network needed).
TOKENIZER_MODEL = "ViT-B-16"

SYSTEM_PROMPT = (
    "You are an expert in facial expression analysis and the Facial Action Coding System (FACS). "
    "You describe what can be seen on a face in plain words."
)
USER_TEMPLATE = (
    "{question}\n"
    "Give {n} distinct descriptions. Each one is a single short phrase of at most 20 words that names "
    "concrete visible facial features (muscle movements, wrinkles, the shape of the brows, eyes, nose, "
    "cheeks and mouth). Each phrase must read naturally after the words "
    '"a photo of a person making a facial expression of {class_name},". '
    "Do not repeat the name of the expression and do not number the phrases."
)

#: Sent when an answer held fewer distinct descriptions than asked for.
MORE_INSTRUCTION = (
    "That gave {got} distinct descriptions; {n} are needed. Reply with {missing} more, different from the "
    'ones above, as the JSON object {{"descriptions": ["...", "..."]}} and nothing else.'
)

_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.)])\s+")


@dataclass(frozen=True)
class DescribeResult:
    """Where the descriptions are, how many requests were sent and how many answers came from cache."""

    path: Path
    n_requests: int
    n_cached: int


# ------------------------------------------------------------------------------------------ messages
def questions_of(llm: LLMConfig) -> list[str]:
    """docs/METHOD.md's question followed by the extra questions (duplicates dropped, order kept)."""
    out: list[str] = []
    for q in [llm.question, *llm.extra_questions]:
        if q not in out:
            out.append(q)
    return out


def build_messages(question: str, class_name: str, n: int) -> list[dict[str, str]]:
    """The chat messages asking ``question`` about ``class_name`` for ``n`` descriptions."""
    user = USER_TEMPLATE.format(question=question.format(class_name=class_name), n=n, class_name=class_name)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------------ validation
def _normalise(text: str) -> str:
    """Drop list markers, surrounding quotes, extra whitespace and trailing periods (to a fixed point)."""
    text = str(text)
    for _ in range(10):
        before = text
        text = _BULLET.sub("", text)
        text = clean_description(text.strip().strip("\"'\u201c\u201d"))
        if text == before:
            break
    return text


def clean_answer(descriptions: Sequence[str], n: int) -> list[str]:
    """Strip, drop empty items and list markers, de-duplicate case-insensitively, keep at most ``n``."""
    return merge_descriptions([descriptions])[:n]


def merge_descriptions(lists: Sequence[Sequence[str]]) -> list[str]:
    """Concatenate description lists in order, normalised and de-duplicated case-insensitively."""
    seen: set[str] = set()
    out: list[str] = []
    for items in lists:
        for item in items:
            text = _normalise(item)
            key = text.casefold()
            if text and key not in seen:
                seen.add(key)
                out.append(text)
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer():  # noqa: ANN202 - open_clip's tokenizer class is not part of its public API
    import open_clip

    return open_clip.get_tokenizer(TOKENIZER_MODEL)


def count_tokens(text: str) -> int:
    """CLIP BPE tokens of ``text`` including the start and end tokens."""
    return len(_tokenizer().encode(text)) + 2


def truncation_flags(classes: dict[str, list[str]]) -> list[DescriptionFlag]:
    """A flag for every description whose fine prompt exceeds CLIP's 77-token context."""
    flags: list[DescriptionFlag] = []
    for class_name, descs in classes.items():
        for desc in descs:
            n = count_tokens(fine_prompt(class_name, desc))
            if n > CLIP_CONTEXT_LENGTH:
                flags.append(
                    DescriptionFlag(class_name=class_name, description=desc, n_tokens=n, truncated=True)
                )
    return flags


# ------------------------------------------------------------------------------------------ files
def model_slug(model: str) -> str:
    """A file-name-safe form of a model name (``gpt-4o-mini``, ``llama3.1-8b``, ...)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", model.lower()).strip("-.")
    return slug[:48] or "model"


def resolve_descriptions_file(path: str | os.PathLike[str]) -> Path:
    """A descriptions file path: as given when it exists (a relative path from the current folder), else
    the packaged file of that repository path (``prompts_cache/curated.json``), else as given."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p
    return shipped_file(p) or p


def load_cached_descriptions(classes: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Check that the committed file at ``path`` holds every class in ``classes``; return its path."""
    file = resolve_descriptions_file(path)
    desc = load_descriptions(file)
    missing = [c for c in classes if c not in desc.classes]
    if missing:
        raise ConfigError(
            f"descriptions file {file} has no descriptions for class {', '.join(repr(m) for m in missing)} "
            f"(it holds {', '.join(desc.classes)}); generate them with an LLM (--llm-model) or add them"
        )
    return file


def output_key(
    classes: Sequence[str], llm: LLMConfig, client: DescriptionClient, questions: list[str]
) -> str:
    """Content key of a generated descriptions file: the inputs that determine it (never the API key)."""
    return content_key(
        "descriptions",
        CACHE_VERSION,
        client.host,
        llm.model,
        list(classes),
        questions,
        llm.n_descriptions,
        {"temperature": llm.temperature, "seed": llm.seed, "max_tokens": llm.max_tokens},
        client.modes(),
        SYSTEM_PROMPT,
        USER_TEMPLATE,
        TEMPLATES["fine"],
    )


# ------------------------------------------------------------------------------------------ main
def get_descriptions(
    classes: Sequence[str],
    llm: LLMConfig,
    out_dir: Path,
    cache_dir: Path,
    *,
    class_set: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> DescribeResult:
    """Descriptions for ``classes``: the committed file (``llm.model == "cached"``) or an LLM generation.

    A generation asks every question for every class (answers served from the response cache in
    ``cache_dir`` when possible), and writes ``<out_dir>/<classset>-<model-slug>-<key12>.json``
    atomically only when all of them succeeded. A failure raises one :class:`LLMError` line; the answers
    obtained before it stay cached, so a rerun asks only for what is missing.
    """
    classes = list(classes)
    if not classes:
        raise ConfigError("no classes to describe")
    if llm.model == "cached":
        return DescribeResult(load_cached_descriptions(classes, llm.descriptions_file), 0, 0)

    client = DescriptionClient(llm)
    questions = questions_of(llm)
    key = output_key(classes, llm, client, questions)
    name = f"{class_set or class_set_name(classes)}-{model_slug(llm.model)}-{key[:12]}.json"
    final = Path(out_dir) / name
    total = len(classes) * len(questions)
    try:
        with file_lock(Path(cache_dir) / "locks" / name):
            if final.exists():
                try:
                    load_descriptions(final)
                    return DescribeResult(final, 0, total)
                except ConfigError:
                    pass  # damaged: regenerate it
            with ResponseCache(cache_dir) as cache:
                by_question, modes_used, n_cached = _ask_all(client, cache, classes, questions, llm, progress)
            merged = {c: merge_descriptions([by_question[q][c] for q in questions]) for c in classes}
            if not llm.allow_shared_descriptions:
                check_distinct(merged, llm.model)
            doc = Descriptions(
                classes=merged,
                by_question=by_question,
                provenance=LLMProvenance(
                    host=client.host,
                    model=llm.model,
                    parameters={
                        "temperature": llm.temperature,
                        "seed": llm.seed,
                        "max_tokens": llm.max_tokens,
                        "n_descriptions": llm.n_descriptions,
                        "response_format": sorted(modes_used)
                        if len(modes_used) > 1
                        else next(iter(modes_used)),
                        "system_prompt": SYSTEM_PROMPT,
                        "user_template": USER_TEMPLATE,
                    },
                    questions=questions,
                    date=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                    package_version=__version__,
                ),
                flags=truncation_flags(merged),
            )
            atomic_write_json(final, doc.model_dump(mode="json"))
            return DescribeResult(final, client.n_requests, n_cached)
    finally:
        client.close()


def _ask_enough(
    client: DescriptionClient, messages: list[dict[str, str]], label: str, llm: LLMConfig
) -> tuple[list[str], Mode]:
    """``llm.n_descriptions`` distinct descriptions for one request: an answer with fewer is followed up
    (up to ``llm.max_reasks`` times) asking for the missing ones; still too few raises :class:`LLMError`."""
    n = llm.n_descriptions
    answer, mode = client.ask(messages, label)
    descs = clean_answer(answer.descriptions, n)
    convo = list(messages)
    for _ in range(llm.max_reasks):
        if len(descs) >= n:
            break
        convo += [
            {"role": "assistant", "content": json.dumps({"descriptions": descs})},
            {"role": "user", "content": MORE_INSTRUCTION.format(got=len(descs), n=n, missing=n - len(descs))},
        ]
        answer, mode = client.ask(convo, label)
        descs = merge_descriptions([descs, answer.descriptions])[:n]
    if len(descs) < n:
        raise LLMError(
            f"model {llm.model!r} gave only {len(descs)} distinct description{'s' if len(descs) != 1 else ''} "
            f"for {label} ({n} asked, {llm.max_reasks} follow-up{'s' if llm.max_reasks != 1 else ''}); use "
            "another model or lower llm.n_descriptions"
        )
    return descs, mode


def check_distinct(classes: dict[str, list[str]], model: str) -> None:
    """Refuse descriptions shared by different classes: a fine prompt that differs only by the class name
    carries no knowledge about the class (e.g. a test server answering one placeholder for every class)."""
    owners: dict[str, list[str]] = {}
    text_of: dict[str, str] = {}
    for class_name, descs in classes.items():
        for d in descs:
            key = d.casefold()
            text_of.setdefault(key, d)
            if class_name not in owners.setdefault(key, []):
                owners[key].append(class_name)
    shared = [(key, names) for key, names in owners.items() if len(names) > 1]
    if shared:
        key, names = max(shared, key=lambda item: len(item[1]))
        more = f" (and {len(shared) - 1} more shared descriptions)" if len(shared) > 1 else ""
        raise LLMError(
            f"model {model!r} gave the same description to classes {', '.join(names)}: {text_of[key]!r}{more}; "
            "descriptions must tell the classes apart: use another model or llm.seed, or set "
            "llm.allow_shared_descriptions=true to accept them"
        )


def _ask_all(
    client: DescriptionClient,
    cache: ResponseCache,
    classes: list[str],
    questions: list[str],
    llm: LLMConfig,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, dict[str, list[str]]], set[Mode], int]:
    """Every (question, class) answer, cached ones first; stops at the first failure."""
    schema = answer_schema()
    by_question: dict[str, dict[str, list[str]]] = {q: {} for q in questions}
    modes_used: set[Mode] = set()
    n_cached = 0
    done = 0
    total = len(classes) * len(questions)
    for q_index, question in enumerate(questions):
        for class_name in classes:
            messages = build_messages(question, class_name, llm.n_descriptions)
            keys = {
                mode: request_key(
                    host=client.host,
                    model=llm.model,
                    messages=client.messages_for_mode(messages, mode),
                    parameters=client.parameters(mode),
                    schema=schema,
                )
                for mode in client.modes()
            }
            hit = next(((m, v) for m, k in keys.items() if (v := cache.get(k)) is not None), None)
            if hit is not None:
                mode, descs = hit
                n_cached += 1
                source = "cache"
            else:
                label = f"class {class_name!r}" + (f" (question {q_index + 1})" if len(questions) > 1 else "")
                try:
                    descs, mode = _ask_enough(client, messages, label, llm)
                except LLMError as exc:
                    if not done:
                        raise
                    raise LLMError(
                        f"{exc.message} [{done} of {total} answers done and cached, no file written; "
                        "a rerun asks only for the missing ones]"
                    ) from None
                cache.set(keys[mode], descs)
                source = "LLM"
            by_question[question][class_name] = descs
            modes_used.add(mode)
            done += 1
            if progress is not None:
                progress(
                    f"{class_name} ({source}, question {q_index + 1}/{len(questions)}): {len(descs)} descriptions"
                )
    return by_question, modes_used, n_cached
