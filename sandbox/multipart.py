"""`multipart/form-data` (RFC 7578) for `req.form()`: text fields and uploaded files. Pure.

The body is already in memory and bounded by the front end's `limits.max_request_body_bytes`
(2 MiB by default), so this parses it whole, in linear passes (`bytes.find`), with limits of
its own on what the body's size does not bound: the number of parts and the size of each
part's header section. A malformed body is a ValueError that says what is wrong; the val may
catch it and answer 400.

Stdlib only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

MAX_PARTS = 1000
MAX_PART_HEADER_BYTES = 8192
MAX_BOUNDARY_CHARS = 70  # RFC 2046 §5.1.1

# A parameter of Content-Type or Content-Disposition: name=token or name="quoted string".
_PARAM_RE = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None  # None: a text field
    content_type: str
    body: bytes

    @property
    def file(self) -> bool:
        return self.filename is not None


def parse_params(header_value: str) -> tuple[str, dict[str, str]]:
    """`'form-data; name="a"; filename="b"'` -> `('form-data', {'name': 'a', ...})`."""
    value, _, rest = header_value.partition(";")
    params: dict[str, str] = {}
    for found in _PARAM_RE.finditer(";" + rest):
        key, raw = found[1].lower(), found[2].strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if key.endswith("*"):  # RFC 5987/8187: charset'language'percent-encoded
            charset, _, encoded = raw.partition("'")
            _, _, encoded = encoded.partition("'")
            key = key[:-1]
            raw = unquote(encoded, encoding=charset or "utf-8", errors="replace")
        params.setdefault(key, raw)
    return value.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    kind, params = parse_params(content_type)
    if kind != "multipart/form-data":
        raise ValueError(f"not a multipart/form-data body: {kind!r}")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS or not boundary.isascii():
        raise ValueError("the multipart body's Content-Type has no valid boundary")
    return boundary.encode("ascii")


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a `multipart/form-data` body, in order. Raises ValueError."""
    delimiter = b"--" + boundary_of(content_type)
    # The first delimiter may open the body or follow a preamble's CRLF.
    position = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if position < 0:
        raise ValueError("the multipart body holds no part (no boundary line found)")
    position += len(delimiter) if position == 0 else len(delimiter) + 2
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", position):
            return parts  # the close delimiter; an epilogue after it is ignored
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise ValueError("a multipart boundary line is malformed")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise ValueError("the multipart body ends before its closing boundary")
        if len(parts) == MAX_PARTS:
            raise ValueError(f"the multipart body has more than {MAX_PARTS} parts")
        parts.append(_part(body[start:end]))
        position = end + 2 + len(delimiter)


def _part(raw: bytes) -> Part:
    if raw.startswith(b"\r\n"):
        head, content = b"", raw[2:]
    else:
        head_end = raw.find(b"\r\n\r\n", 0, MAX_PART_HEADER_BYTES + 4)
        if head_end < 0:
            raise ValueError(
                f"a multipart part's headers are missing or over {MAX_PART_HEADER_BYTES} bytes"
            )
        head, content = raw[:head_end], raw[head_end + 4 :]
    headers: dict[str, str] = {}
    # Browsers send file names as raw UTF-8 in the header (RFC 7578 §4.2 allows it).
    for line in head.decode("utf-8", errors="replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"a multipart part has a malformed header line: {line[:100]!r}")
        headers.setdefault(name.strip().lower(), value.strip())
    disposition, params = parse_params(headers.get("content-disposition", ""))
    if disposition != "form-data" or "name" not in params:
        raise ValueError("a multipart part has no 'Content-Disposition: form-data; name=...'")
    return Part(
        name=params["name"],
        filename=params.get("filename"),
        content_type=headers.get("content-type", "text/plain"),
        body=content,
    )
