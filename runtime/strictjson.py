"""JSON as RFC 8259 defines it, for input valrun did not write (clients, workers): UTF-8
only (json.loads(bytes) would also guess UTF-16 and UTF-32), no NaN or Infinity, and nesting
deep enough to exhaust Python's stack refused like any other bad input, not as a crash."""

from __future__ import annotations

import json


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | str) -> object:
    """The value of `data`; ValueError, saying what is wrong, for anything but such JSON."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
