"""A request its client abandoned stops its work (docs/fairness.md §2).

Hypercorn does not cancel the app when a client goes: it puts an `http.disconnect` message
on the request's ASGI queue, for HTTP/1.1 when the connection closes and for HTTP/2 when the
stream is reset or the connection closes. So once the body is read, one task waits on
`receive()` next to the work; a disconnect cancels the work, which reaches the pool as a
cancellation: the worker, in an unknown state, is killed (`Pool._release`), its slot is free
at once, and the record says `cancelled`. Nothing here depends on the protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from hypercorn.typing import ASGIReceiveCallable

from runtime.errors import ClientGoneError

T = TypeVar("T")


async def unless_abandoned(receive: ASGIReceiveCallable, work: Callable[[], Awaitable[T]]) -> T:
    """`work()`'s result, or ClientGoneError (499, which nobody reads) once the client has
    gone; call it after the request's body has been read."""
    results: list[T] = []
    errors: list[Exception] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        try:
            results.append(await work())
        except Exception as exc:  # raised again below: out of the nursery, not in a group
            errors.append(exc)
        nursery.cancel_scope.cancel()
    if errors:
        raise errors[0]
    if not results:
        raise ClientGoneError("the client went away before the answer; its work was stopped")
    return results[0]


async def _cancel_on_disconnect(receive: ASGIReceiveCallable, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
