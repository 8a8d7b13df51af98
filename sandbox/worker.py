"""The worker: load one val version, then serve its invocations one at a time, until EOF.

Run as `python -I -m sandbox.worker`. The protocol travels on the file descriptors that were
stdin and stdout; they are moved out of the way first, so nothing a library prints can
corrupt a frame. Every failure of the val becomes an `error` frame; a failure of the protocol
ends the process, and the front end answers 502 for it.

Two ops reach a loaded worker: `http` (the web host: the export gets a Request and returns a
response) and `call` (Run and Eval: the export is called with JSON args and its value goes
back as JSON). The value is turned into JSON here, inside the sandbox: a val's objects (its
`__eq__`, `__hash__`, a dict subclass) must never run in the front end.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import BinaryIO

from sandbox.errors import BadMessageError, ValError, describe
from sandbox.evaluate import EVAL_NAME, compile_eval, evaluate
from sandbox.http import Request, dumps_json, to_response
from sandbox.limits import WorkerLimits, apply_limits, arm_cpu_limit
from sandbox.policy import LogBuffer, check_source_size, load_val, val_filename
from sandbox.tether import UNTETHERED, Tether
from sandbox.wire import Frame, FrameDecoder, ProtocolError, read_frame, write_frame


def _take_protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    inp, out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    return os.fdopen(inp, "rb", buffering=0), os.fdopen(out, "wb")


def _str(head: dict[str, object], key: str) -> str:
    value = head.get(key)
    if not isinstance(value, str):
        raise BadMessageError(f"{key!r} must be a string")
    return value


def _header_list(raw: object) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in raw
    ):
        raise BadMessageError("'headers' must be a list of [name, value] strings")
    return [(name, value) for name, value in raw]


def _call_args(body: bytes) -> list[object] | None:
    """The args of a `call`: a JSON array, or None (empty body) for "do not call"."""
    if not body:
        return None
    try:
        args = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMessageError("'call' args are not JSON") from None
    if not isinstance(args, list):
        raise BadMessageError("'call' args are not a JSON array")
    return args


def result_json(value: object) -> bytes:
    """The JSON of a Run or Eval result, or ValError naming what is not JSON."""
    try:
        text = dumps_json(value)
    except (TypeError, ValueError) as exc:
        # json names the offending type itself: "Object of type set is not JSON
        # serializable", "Out of range float values are not JSON compliant" (NaN, Infinity).
        raise ValError(
            f"the result is not JSON: {exc}; return None, bool, int, float, str, "
            "or lists and dicts of them"
        ) from None
    # A lone surrogate ("\ud800") cannot be UTF-8; backslashreplace writes it as the JSON
    # escape `\ud800`, which is exactly right because it can only occur inside a string.
    return text.encode("utf-8", errors="backslashreplace")


class Worker:
    def __init__(
        self, name: str, export: Callable[[], object], limits: WorkerLimits, log: LogBuffer
    ) -> None:
        self.name = name
        #: The export, fetched per invocation: a module val's is its top-level name; Eval's
        #: is the value of the code, run when called for.
        self.export = export
        self.limits = limits
        self.log = log
        self.filename = val_filename(name)

    def failure(self, request_id: object, exc: BaseException) -> Frame:
        head = {"op": "error", "id": request_id, **describe(exc, self.filename)}
        head["log"] = self.log.take()
        return Frame(head)

    def too_large(self, request_id: object, size: int) -> Frame:
        return Frame(
            {
                "op": "error",
                "id": request_id,
                "type": "response_too_large",
                "message": f"the response body of {size} bytes is over "
                f"the {self.limits.max_response_body_bytes}-byte limit",
                "log": self.log.take(),
            }
        )

    def serve_call(self, frame: Frame) -> Frame:
        request_id = frame.head.get("id")
        args = _call_args(frame.body)
        try:
            value = self.export()
            # Run always sends args (maybe none): a callable export is called, another
            # export is the result. Eval without args returns its value as it is.
            if args is not None and callable(value):
                value = value(*args)
            elif callable(value):
                raise ValError(
                    f"the value is a {type(value).__name__}, which is not JSON; send args "
                    "(maybe an empty list) to call it"
                )
            body = result_json(value)
        except BaseException as exc:  # the val's failure, whatever it raised, is one reply
            return self.failure(request_id, exc)
        if len(body) > self.limits.max_response_body_bytes:
            return self.too_large(request_id, len(body))
        return Frame({"op": "result", "id": request_id, "log": self.log.take()}, body)

    def serve_http(self, frame: Frame) -> Frame:
        head = frame.head
        request_id = head.get("id")
        request = Request(
            method=_str(head, "method"),
            url=_str(head, "url"),
            path=_str(head, "path"),
            query_string=_str(head, "query"),
            headers=_header_list(head.get("headers")),
            body=frame.body,
        )
        try:
            export = self.export()
            if not callable(export):
                raise ValError(
                    f"{self.name!r} is a {type(export).__name__}; an HTTP val must export "
                    "a function that takes a Request"
                )
            response = to_response(export(request))
            if len(response.body) > self.limits.max_response_body_bytes:
                return self.too_large(request_id, len(response.body))
        except BaseException as exc:  # the val's failure, whatever it raised, is one reply
            return self.failure(request_id, exc)
        reply = {
            "op": "response",
            "id": request_id,
            "status": response.status,
            "headers": response.header_pairs(),
            "log": self.log.take(),
        }
        return Frame(reply, response.body)


def load_export(
    mode: str, source: str, name: str, env: dict[str, str], log: LogBuffer, max_source_bytes: int
) -> Callable[[], object]:
    """Compile the code (and run a val's module once); a function that gives the export."""
    check_source_size(source, max_source_bytes)
    if mode == "eval":
        compiled = compile_eval(source)
        return lambda: evaluate(compiled, env, log)
    val = load_val(source, name, env, log)
    return lambda: val.export


def serve(inp: BinaryIO, out: BinaryIO, *, confined: bool = False, tethered: bool = False) -> int:
    """Load one val, then serve it until EOF. `confined`: the process limits are in force
    already (the fork server's sandbox.confine set them); otherwise apply them here.
    `tethered`: `inp` is a socket whose hang-up ends the worker even while a val runs."""
    tether = Tether(inp.fileno()) if tethered else UNTETHERED
    decoder = FrameDecoder()
    load = read_frame(inp, decoder)
    if load is None:
        return 0  # closed while generic: a spare worker at shutdown
    if load.op != "load":
        raise BadMessageError(f"expected a load frame, got {load.op!r}")
    limits = WorkerLimits.from_head(load.head.get("limits"))
    name = _str(load.head, "name")
    env = load.head.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise BadMessageError("'env' must map names to strings")
    mode = load.head.get("mode", "module")
    if mode not in ("module", "eval"):
        raise BadMessageError(f"unknown mode {mode!r}")
    if mode == "eval":
        name = EVAL_NAME  # evaluate compiles as val_filename(EVAL_NAME), whatever was sent
    if not confined:
        apply_limits(limits)
    arm_cpu_limit(limits)
    log = LogBuffer(limits.max_log_bytes)
    source = load.body.decode("utf-8", errors="replace")
    try:
        with tether:
            export = load_export(mode, source, name, env, log, limits.max_source_bytes)
    except BaseException as exc:  # a val that fails to load is one error reply, then exit
        write_frame(
            out, Frame({"op": "error", **describe(exc, val_filename(name)), "log": log.take()})
        )
        return 0
    worker = Worker(name, export, limits, log)
    serve_op = {"http": worker.serve_http, "call": worker.serve_call}
    write_frame(out, Frame({"op": "loaded", "log": log.take()}))
    while (frame := read_frame(inp, decoder)) is not None:
        if not isinstance(frame.op, str) or frame.op not in serve_op:
            raise BadMessageError(f"unknown op {frame.op!r}")
        with tether:
            reply = serve_op[frame.op](frame)
        # A worker that is out of memory or near its life's CPU budget says so and exits
        # after this reply; the front end never sends it another request.
        retire = reply.head.get("type") == "memory_limit" or not arm_cpu_limit(limits)
        reply.head["retire"] = retire
        write_frame(out, reply)
        if retire:
            return 0
    return 0


def main() -> int:
    inp, out = _take_protocol_streams()
    try:
        return serve(inp, out)
    except (ProtocolError, BadMessageError) as exc:
        print(f"valrun worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
