"""Env values out of what non-owners and records see, in every form Python prints them.

A val's error message and log are its own text, and a val that prints or raises with an env
value in it is the common accident (`KeyError`, `ValueError(f"bad token {tok!r}")`): Python
does not print the value as it is, but escaped. `repr` escapes quotes, backslashes and line
breaks (and picks its quote), `ascii` and JSON escape non-ASCII, `%.200R` in C error messages
cuts it, and valrun itself cuts a message at 4096 characters and a log at its limit. So each
value is looked for in all those forms (`forms`, two levels deep: the repr of a repr is what a
`KeyError` of a repr'd string prints), and a form is masked when it appears whole, when a long
prefix of it appears (`PREFIX_CHARS`: a cut made by Python), or when a shorter prefix ends the
text or stands right before one of valrun's own cut markers.

What this cannot catch is a value the val transformed itself (reversed, base64, one character
per line): masking is a guard against accidents, never a boundary (docs/contract.md §9.3).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable

#: Env values shorter than this are not masked: masking "1" or "on" would garble every log.
MIN_MASKED_CHARS = 4
#: A prefix this long of a longer value is masked wherever it appears (Python's cut reprs).
PREFIX_CHARS = 12
# Where valrun (or the worker) cut a text: what stands right before may be a cut-off value.
_CUT_MARKERS = re.compile(r"\n\[log truncated|\s\[\.\.\.|\.\.\.")

Env = tuple[tuple[str, str], ...]


def _one_level(value: str) -> set[str]:
    quoted = repr(value)[1:-1]
    return {
        value,
        quoted,  # repr: quotes, backslashes, line breaks, non-printables escaped
        ascii(value)[1:-1],  # and non-ASCII as \xe9, \u20ac
        json.dumps(value)[1:-1],  # JSON-escaped, ASCII
        json.dumps(value, ensure_ascii=False)[1:-1],
        value.encode("unicode_escape").decode("ascii"),
        repr(value.encode("utf-8", errors="backslashreplace"))[2:-1],  # printed as bytes
        # repr picks " when the value has ' and no "; the other pick escapes the other quote.
        value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n"),
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"),
    }


def forms(value: str) -> list[str]:
    """Every form of `value` to look for, longest first."""
    found: set[str] = set()
    for first in _one_level(value):
        found |= _one_level(first)
    # Each line of a multi-line value, as it is printed on a line of its own.
    for line in value.splitlines():
        if len(line.strip()) >= MIN_MASKED_CHARS:
            found |= _one_level(line)
    return sorted((f for f in found if len(f) >= MIN_MASKED_CHARS), key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def _patterns(env: Env) -> tuple[tuple[str, str], ...]:
    """(form, key) for each env value long enough to mask, longest form first."""
    pairs = [
        (form, key) for key, value in env if len(value) >= MIN_MASKED_CHARS for form in forms(value)
    ]
    return tuple(sorted(pairs, key=lambda pair: len(pair[0]), reverse=True))


def _matched(text: str, start: int, form: str) -> int:
    """How many leading characters of `form` stand in `text` at `start`."""
    low, high = MIN_MASKED_CHARS, min(len(form), len(text) - start)
    while low < high:  # the longest k with text[start:start+k] == form[:k]
        mid = (low + high + 1) // 2
        if text.startswith(form[:mid], start):
            low = mid
        else:
            high = mid - 1
    return low


def _mask_cut(text: str, form: str, key: str) -> str:
    """Mask what is left of `form` where it was cut: a long prefix anywhere, or a shorter
    one that ends the text or stands before a cut marker."""
    anchor = form[:MIN_MASKED_CHARS]
    ends = {len(text)} | {m.start() for m in _CUT_MARKERS.finditer(text)}
    spans: list[tuple[int, int]] = []
    start = text.find(anchor)
    while start != -1:
        length = _matched(text, start, form)
        if length >= PREFIX_CHARS or start + length in ends:
            spans.append((start, start + length))
            start = text.find(anchor, start + length)
        else:
            start = text.find(anchor, start + 1)
    for begin, end in reversed(spans):
        text = text[:begin] + f"[env {key}]" + text[end:]
    return text


def mask_secrets(text: str, env: Iterable[tuple[str, str]]) -> str:
    """`text` with every env value (of MIN_MASKED_CHARS or more), in any of its printed forms,
    whole or cut, replaced by `[env KEY]`."""
    if not text:
        return text
    patterns = _patterns(tuple(env))
    # Whole forms first, longest first, so that a value that contains another, or a form
    # that starts like another, is masked whole; then what is left of cut ones.
    for form, key in patterns:
        if form in text:
            text = text.replace(form, f"[env {key}]")
    for form, key in patterns:
        if form[:MIN_MASKED_CHARS] in text:
            text = _mask_cut(text, form, key)
    return text
