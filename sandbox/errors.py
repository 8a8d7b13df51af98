"""Errors on the worker side, and how a val's exception is described to the front end.

    SandboxError
    ├── ValError            the val is wrong: compile error, no export, bad return value
    └── BadMessageError     the front end sent a message this worker cannot serve

A val's own exception is not wrapped: `describe` turns any BaseException into the `Failure`
message that crosses the wire, naming only the val's own lines.
"""

from __future__ import annotations

import traceback
from types import TracebackType

from sandbox.messages import Failure, FailureType

#: What one failure may say: the front end shows no more (runtime.reply), and a message of
#: megabytes must not outgrow the wire's head limit and take the worker down with it.
MAX_MESSAGE_CHARS = 3500  # under the front end's 4096, with room for the marker and a frame
MAX_FRAMES = 64
MAX_FRAME_CHARS = 200


class SandboxError(Exception):
    pass


class ValError(SandboxError):
    """The val itself is at fault; the message says what to change."""


class BadMessageError(SandboxError):
    pass


def _val_frames(tb: TracebackType | None, filename: str) -> list[str]:
    # Host frames (this package, RestrictedPython, the stdlib) are dropped: their paths
    # describe the host, and the val's author can do nothing with them. Frames of vals it
    # imported (`<val alice/util>`, sandbox.imports) are kept, named.
    frames = []
    for frame in traceback.extract_tb(tb):
        if frame.filename == filename:
            where = ""
        elif frame.filename.startswith("<val ") and "/" in frame.filename:
            where = frame.filename[len("<val ") : -1] + " "
        else:
            continue
        frames.append(f"{where}line {frame.lineno}, in {frame.name}"[:MAX_FRAME_CHARS])
    return frames[-MAX_FRAMES:]


def bounded(message: str) -> str:
    """A message cut to MAX_MESSAGE_CHARS, marked when cut."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    more = len(message) - MAX_MESSAGE_CHARS
    return f"{message[:MAX_MESSAGE_CHARS]} [... {more} more characters]"


def describe(
    exc: BaseException, filename: str, request_id: int | None = None, log: str = ""
) -> Failure:
    """The wire description of a failed invocation. Never raises."""
    kind: FailureType
    if isinstance(exc, MemoryError):
        kind, message = "memory_limit", "the val ran out of memory"
    elif isinstance(exc, ValError):
        kind, message = "val_error", str(exc)
    else:
        try:
            text = str(exc)
        except BaseException:  # a val's exception whose __str__ itself raises
            text = "<unprintable exception>"
        kind = "val_error"
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        # `type(...) is str` first: a val's SyntaxError subclass can carry any object as its
        # filename, and comparing it would run that object's __eq__ in here.
        if (
            isinstance(exc, SyntaxError)
            and type(exc.filename) is str
            and exc.filename == filename
            and type(exc.lineno) is int
        ):
            message = f"SyntaxError: {exc.msg} (line {exc.lineno})"
    frames = _val_frames(exc.__traceback__, filename)
    message = bounded(message)
    if frames and kind == "val_error":
        message = f"{message} ({frames[-1]})"
    return Failure(request_id, kind, message, tuple(frames), log)
