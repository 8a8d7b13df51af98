"""The access log's line: one per request, with nothing a client can use to forge lines.

A request's path is percent-decoded (`%0a` is a newline) and its Host header is the
client's text: written raw, either could end the line and start a fake one. Every control
character, C0 and C1, the Unicode line and paragraph separators and the bidirectional
overrides (which a terminal or viewer would act on), and the backslash (so an escape cannot be
forged either) are written as `\\xNN` or `\\uNNNN`.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    # Every character _UNSAFE names but the backslash is one str.isprintable refuses (Cc, Cf,
    # Zl, Zp): a line with neither is returned as it is, without a regex pass.
    if text.isprintable() and "\\" not in text:
        return text
    return _UNSAFE.sub(_escaped, text)


def access_line(
    client: str, method: str, host: str | None, path: str, status: int, elapsed_s: float, size: int
) -> str:
    return (
        f"{escape(client)} {escape(method)} {escape(host or '-')} {escape(path)} "
        f"{status} {elapsed_s * 1000:.1f}ms {size}B"
    )
