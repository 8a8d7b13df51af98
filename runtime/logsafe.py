"""Text from clients made safe to print in a log line.

A path is percent-decoded before valrun sees it (`%0A` is a line feed), and a Host header or a
method can carry any byte hypercorn lets through: printed as they are, a client could end the
access line and forge the next one, or move the cursor of whoever reads the log in a
terminal. So every control character (C0, DEL, C1, and the Unicode line and paragraph
separators) is printed as a Python escape, and the backslash itself as `\\\\`, so an escape
in the log always means one character that was escaped. Everything else is printed as it is.
"""

from __future__ import annotations

import re

_UNPRINTABLE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with control characters and backslashes escaped: one log line, never two."""
    return _UNPRINTABLE.sub(_escape, text)
