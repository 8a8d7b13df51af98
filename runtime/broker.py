"""The front end's side of what vals ask for while they run (`std` in the sandbox).

The pool hands every `Ask` a worker sends during an invocation to `Broker.answer`, inside that
invocation's wall-time scope: an ask still being answered when the val's time is up is
cancelled with it. Each capability (outbound HTTP, storage) registers a handler for its ask
kinds; an ask of a kind nobody handles is a protocol error, and the worker is killed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from runtime.reply import protocol_error
from sandbox.messages import Ask
from sandbox.wire import Frame

if TYPE_CHECKING:
    from runtime.pool import ValSpec


class Answer(Protocol):
    """What a handler returns: any message (it has `to_frame`)."""

    def to_frame(self) -> Frame: ...


#: Answers one kind of ask for the val of `spec` (its owner's limits apply).
AskHandler = Callable[["ValSpec", Any], Awaitable[Answer]]


class Broker:
    def __init__(self, handlers: Mapping[type[Ask], AskHandler] | None = None) -> None:
        self.handlers: dict[type[Ask], AskHandler] = dict(handlers or {})

    async def answer(self, spec: ValSpec, ask: Ask) -> Frame:
        handler = self.handlers.get(type(ask))
        if handler is None:
            raise protocol_error(f"nothing here answers a {ask.op!r} ask")
        return (await handler(spec, ask)).to_frame()
