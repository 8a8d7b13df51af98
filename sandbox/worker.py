"""The worker: load one val version, then serve its invocations one at a time, until EOF.

Run as `python -I -m sandbox.worker`. The protocol travels on the file descriptors that were
stdin and stdout; they are moved out of the way first, so nothing a library prints can
corrupt a frame. Every failure of the val becomes an `error` frame; a failure of the protocol
ends the process, and the front end answers 502 for it.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

from sandbox.errors import BadMessageError, ValError, describe
from sandbox.http import Request, to_response
from sandbox.limits import WorkerLimits, apply_limits, arm_cpu_limit
from sandbox.policy import LoadedVal, LogBuffer, load_val
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


class Worker:
    def __init__(self, val: LoadedVal, limits: WorkerLimits, log: LogBuffer) -> None:
        self.val = val
        self.limits = limits
        self.log = log
        self.filename = f"<val {val.name}>"

    def failure(self, request_id: object, exc: BaseException) -> Frame:
        head = {"op": "error", "id": request_id, **describe(exc, self.filename)}
        head["log"] = self.log.take()
        return Frame(head)

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
        export = self.val.export
        try:
            if not callable(export):
                raise ValError(
                    f"{self.val.name!r} is a {type(export).__name__}; an HTTP val must export "
                    "a function that takes a Request"
                )
            response = to_response(export(request))
            if len(response.body) > self.limits.max_response_body_bytes:
                return Frame(
                    {
                        "op": "error",
                        "id": request_id,
                        "type": "response_too_large",
                        "message": f"the response body of {len(response.body)} bytes is over "
                        f"the {self.limits.max_response_body_bytes}-byte limit",
                        "log": self.log.take(),
                    }
                )
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


def serve(inp: BinaryIO, out: BinaryIO) -> int:
    decoder = FrameDecoder()
    load = read_frame(inp, decoder)
    if load is None or load.op != "load":
        return 2
    limits = WorkerLimits.from_head(load.head.get("limits"))
    name = _str(load.head, "name")
    env = load.head.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        return 2
    apply_limits(limits)
    arm_cpu_limit(limits)
    log = LogBuffer(limits.max_log_bytes)
    try:
        val = load_val(load.body.decode("utf-8", errors="replace"), name, env, log)
    except BaseException as exc:  # a val that fails to load is one error reply, then exit
        write_frame(
            out, Frame({"op": "error", **describe(exc, f"<val {name}>"), "log": log.take()})
        )
        return 0
    worker = Worker(val, limits, log)
    write_frame(out, Frame({"op": "loaded", "log": log.take()}))
    while (frame := read_frame(inp, decoder)) is not None:
        if frame.op != "http":
            raise BadMessageError(f"unknown op {frame.op!r}")
        reply = worker.serve_http(frame)
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
