"""Tokenisation helpers: fit hard prompts into CLIP's context without ever cutting the class name.

open_clip's tokenizer silently cuts a text that is too long (keeping EOS in the last slot), which could
cut the end of a description mid-word — or, for a long enough prefix, the class name. :func:`fit_prompt`
instead drops whole words from the end of the description until ``SOS + tokens + EOS`` fits, and reports
that it did. Token counts always include SOS and EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpafer.errors import ConfigError, DataError

#: Punctuation stripped from the end of a truncated description (so "a, b, c" → "a, b", not "a, b,").
_TRAILING = " \t,;:-–—/"


def _encode(tokenizer: Any) -> Callable[[str], list[int]]:
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode) or not hasattr(tokenizer, "sot_token_id") or not hasattr(tokenizer, "eot_token_id"):
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer (encode, sot/eot ids); "
            "hard prompts need an open_clip SimpleTokenizer"
        )
    return encode


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` including SOS and EOS."""
    return len(_encode(tokenizer)(text)) + 2


def compose_description(prefix: str, description_words: Sequence[str], separator: str, suffix: str) -> str:
    """``prefix + separator + description + suffix``; without words the separator is left out."""
    desc = " ".join(description_words).rstrip(_TRAILING)
    if not desc:
        return f"{prefix}{suffix}"
    return f"{prefix}{separator}{desc}{suffix}"


def fit_prompt(
    tokenizer: Any,
    class_prefix_text: str,
    description: str,
    context_length: int,
    *,
    separator: str = ", ",
    suffix: str = ".",
) -> tuple[str, int, bool]:
    """Fit ``class_prefix_text + separator + description + suffix`` into ``context_length`` tokens.

    ``class_prefix_text`` holds the template and class name (e.g. ``"a photo of a person making a facial
    expression of happiness"``) and is never cut. If the whole prompt does not fit (SOS + tokens + EOS >
    ``context_length``), whole words are dropped from the end of ``description`` (trailing punctuation
    of the last kept word removed) until it fits.

    Returns ``(text, n_tokens, truncated)`` with ``n_tokens`` counting SOS and EOS.
    Raises :class:`DataError` when even the prefix without any description does not fit.
    """
    words = description.split()
    full = compose_description(class_prefix_text, words, separator, suffix)
    n_full = count_tokens(tokenizer, full)
    if n_full <= context_length:
        return full, n_full, False
    bare = compose_description(class_prefix_text, [], separator, suffix)
    n_bare = count_tokens(tokenizer, bare)
    if n_bare > context_length:
        raise DataError(
            f"prompt {bare!r} needs {n_bare} tokens, more than CLIP's context of {context_length}, even without "
            "a description; shorten the class name or template"
        )
    # Largest number of leading words that fits (token counts grow with words: CLIP's BPE is per word).
    lo, hi = 0, len(words) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, compose_description(class_prefix_text, words[:mid], separator, suffix)) <= context_length:
            lo = mid
        else:
            hi = mid - 1
    text = compose_description(class_prefix_text, words[:lo], separator, suffix)
    return text, count_tokens(tokenizer, text), True


def tokenize_exact(tokenizer: Any, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids ``[N, context_length]``; unlike open_clip's tokenizer, refuses to cut a text silently."""
    encode = _encode(tokenizer)
    sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot, *encode(text), eot]
        if len(ids) > context_length:
            raise DataError(f"prompt needs {len(ids)} tokens, more than CLIP's context of {context_length}: {text!r}")
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def real_token_mask(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Boolean ``[N, L]`` mask of the real tokens strictly between SOS (position 0) and the first EOS."""
    is_eot = tokens == eot_token_id
    if not bool(is_eot.any(dim=1).all()):
        raise ValueError("every token row needs an EOS token")
    eot_pos = is_eot.int().argmax(dim=1)  # first EOS
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    return (pos >= 1) & (pos < eot_pos.unsqueeze(1))
