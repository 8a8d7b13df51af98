"""JSON as RFC 8259 defines it, for input valrun did not write (clients, workers): UTF-8
only (json.loads(bytes) would also guess UTF-16 and UTF-32), no NaN or Infinity, and nesting
deep enough to exhaust Python's stack refused like any other bad input, not as a crash.

A client's JSON must also mean in the val what it says on the wire (`loads`): a lone surrogate
(`"\\ud800"`) is valid JSON but no UTF-8 text, and `1e400` is a valid number that Python can
only read as infinity, which valrun refuses as a literal. Both are refused with a message
rather than handed on changed. And its object keys are bounded (sandbox.fields): every one is
hashed, in the front end and again in the worker.
"""

from __future__ import annotations

import json
import math
import re

from sandbox.fields import TooManyFieldsError, loads_json
from sandbox.limits import WorkerLimits

__all__ = ["NestingError", "TooManyFieldsError", "check_any", "loads", "loads_any"]

_DEFAULT_LIMITS = WorkerLimits()
# A lone surrogate can only come from a `\uD800`-`\uDFFF` escape: the text itself is UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class NestingError(ValueError):
    """Valid JSON nested deeper than Python's stack allows to parse."""


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _exact_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large: Python would read it as infinity")
    return value


def loads_any(data: bytes | str) -> object:
    """The value of `data`; ValueError, saying what is wrong, for anything but RFC 8259 JSON."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise NestingError("it is nested too deeply") from None


def _discard(value: object) -> None:
    return None


# Objects and numbers are dropped as soon as they are parsed: checking a worker's 5 MiB
# result held a tree of Python objects twelve times its size (runtime.reply).
_CHECKER = json.JSONDecoder(
    object_pairs_hook=_discard,
    parse_float=_discard,
    parse_int=_discard,
    parse_constant=_refuse_constant,
)


def check_any(data: bytes) -> None:
    """Raise as `loads_any` would for anything but RFC 8259 JSON, without keeping its value:
    objects and numbers are not built (arrays and strings still are, for the moment the
    check takes)."""
    try:
        _CHECKER.decode(data.decode("utf-8"))
    except RecursionError:
        raise NestingError("it is nested too deeply") from None


def loads(data: bytes | str, limits: WorkerLimits = _DEFAULT_LIMITS) -> object:
    """A client's JSON: `loads_any`, and refused (ValueError) when the val could not see it as
    sent (a lone surrogate, a number that overflows), or TooManyFieldsError when it has more
    object keys than `limits` allow."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = loads_json(
            text,
            limits.max_json_keys,
            limits.max_json_object_keys,
            parse_constant=_refuse_constant,
            parse_float=_exact_float,
        )
    except RecursionError:
        raise NestingError("it is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ValueError(
            "a string in it holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
            "which is not text: send UTF-8 text, or pair the surrogates"
        )
    return value


def _has_lone_surrogate(value: object) -> bool:
    # Only reached when the text has a surrogate escape: pairs are joined by the parser, so
    # a surrogate left in a parsed string is a lone one. Iterative: the nesting is bounded
    # only by the stack the parser had.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return False
