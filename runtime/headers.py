"""The request-header limits, enforced on what arrived rather than on how it was read.

h11 (under hypercorn) bounds only a header block that is still incomplete when a read ends,
so a block that arrives whole in a couple of reads passes at twice the limit or more, and
it counts no lines at all. The figures in [limits] are checked here, on every request,
before anything else looks at it.
"""

from __future__ import annotations

from collections.abc import Iterable

from runtime.config import LimitsConfig
from runtime.errors import HeadersTooLargeError

#: ": " and CRLF around each header line; the spaces and "HTTP/1.1" CRLF of the request line.
LINE_OVERHEAD_BYTES = 4
REQUEST_LINE_OVERHEAD_BYTES = 12


def check_request_headers(
    method: str,
    raw_path: bytes,
    query_string: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    limits: LimitsConfig,
) -> None:
    """Raise HeadersTooLargeError (431) for too many header lines or too many bytes."""
    size = len(method) + len(raw_path) + len(query_string) + REQUEST_LINE_OVERHEAD_BYTES
    count = 0
    for name, value in headers:
        count += 1
        size += len(name) + len(value) + LINE_OVERHEAD_BYTES
    if count > limits.max_request_headers:
        raise HeadersTooLargeError(
            f"the request has {count} header lines; at most {limits.max_request_headers} "
            "are accepted"
        )
    if size > limits.max_request_header_bytes:
        raise HeadersTooLargeError(
            f"the request line and headers are {size} bytes; at most "
            f"{limits.max_request_header_bytes} are accepted"
        )
