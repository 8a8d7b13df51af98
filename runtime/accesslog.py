"""The access log's line: one per request, with nothing a client can use to forge lines.

A request's path is percent-decoded (`%0a` is a newline) and its Host header is the
client's text: written raw, either could end the line and start a fake one. Every control
character (and the backslash, so an escape cannot be forged either) is written as `\\xNN`.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escape(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def access_line(
    client: str, method: str, host: str | None, path: str, status: int, elapsed_s: float, size: int
) -> str:
    return (
        f"{escape(client)} {escape(method)} {escape(host or '-')} {escape(path)} "
        f"{status} {elapsed_s * 1000:.1f}ms {size}B"
    )
