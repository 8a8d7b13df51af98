"""A worker's reply, made sure to fit the wire: what a val returns or raises never kills it.

The front end refuses a frame whose head is over the wire's limit (`sandbox.wire`) and kills
the worker that sent it, as it must with a peer that breaks the protocol. An honest worker
therefore never sends one: a response whose headers would not fit, or a failure whose log
would not, is turned here into a smaller reply that says what was too large. That is the
val's error (502 with a message), and the worker goes on serving.
"""

from __future__ import annotations

from dataclasses import replace

from sandbox.messages import Failure, HttpResponse, Loaded, Reply
from sandbox.wire import DEFAULT_MAX_HEAD_BYTES, encode_frame

#: Room left in the head for the fields around a log or message.
_HEAD_SLACK_BYTES = 16 * 1024


def encode_reply(reply: Reply | Loaded, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> bytes:
    """The reply's frame as bytes, with a head under `max_head_bytes`. Never raises for what
    the val put in it."""
    data = encode_frame(reply.to_frame())
    if _head_bytes(data) <= max_head_bytes:
        return data
    if isinstance(reply, HttpResponse):
        size = _head_bytes(data)
        reply = Failure(
            reply.id,
            "response_too_large",
            f"the response's headers and log are {size} bytes, over the "
            f"{max_head_bytes}-byte limit of what a worker may send back",
            log=reply.log,
            retire=reply.retire,
        )
        data = encode_frame(reply.to_frame())
        if _head_bytes(data) <= max_head_bytes:
            return data
    # Only the log can still be this large (a message is bounded by sandbox.errors): cut it.
    keep = max(0, (max_head_bytes - _HEAD_SLACK_BYTES) // 6)  # an escaped char is <= 6 bytes
    cut = reply.log[:keep] + f"\n[log truncated: over the {max_head_bytes}-byte reply limit]"
    return encode_frame(replace(reply, log=cut).to_frame())


def _head_bytes(data: bytes) -> int:
    return int.from_bytes(data[:4], "big")
