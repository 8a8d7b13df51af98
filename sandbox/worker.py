"""The worker: load one val version, then serve its invocations one at a time, until EOF.

Run as `python -I -m sandbox.worker`. The protocol travels on the file descriptors that were
stdin and stdout; they are moved out of the way first, so nothing a library prints can
corrupt a frame. Every failure of the val becomes an `error` frame; a failure of the protocol
ends the process, and the front end answers 502 for it.

The front end may send the next requests before this one is answered (pipelining,
runtime/pipeline.py): they wait in the socket, or in `Channel.ahead` if they arrived while an
ask waited for its answer, and are served in the order sent, one at a time.

Three ops reach a loaded worker: `http` (the web host: the export gets a Request and returns
a response), `call` (Run and Eval: the export is called with JSON args and its value goes
back as JSON) and `cron` (a scheduled run: the export gets an Interval). The value is turned
into JSON here, inside the sandbox: a val's objects (its `__eq__`, `__hash__`, a dict
subclass) must never run in the front end.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import BinaryIO

from sandbox.check import check_source
from sandbox.errors import BadMessageError, ValError, describe
from sandbox.evaluate import EVAL_NAME, compile_eval, evaluate
from sandbox.facades import Facade
from sandbox.http import Request, dumps_json, to_response
from sandbox.imports import ModuleHook, ValImporter, ValPath
from sandbox.interval import Interval
from sandbox.limits import WorkerLimits, apply_limits, arm_cpu_limit
from sandbox.messages import (
    INVOCATION_OPS,
    LOAD_ASK_ID,
    MAX_PIPELINE_WINDOW,
    Ask,
    Call,
    Checked,
    Failure,
    HttpRequest,
    HttpResponse,
    ImportAsk,
    Invocation,
    Load,
    Loaded,
    M,
    Reply,
    Result,
    ScheduledRun,
    parse,
)
from sandbox.policy import (
    LogBuffer,
    Prefetch,
    check_source_size,
    load_val,
    run_module,
    val_filename,
)
from sandbox.replies import encode_reply
from sandbox.std import make_std
from sandbox.tether import UNTETHERED, Tether, Untethered
from sandbox.wire import Frame, FrameDecoder, ProtocolError, read_frame, write_frame


def _take_protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    inp, out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    return os.fdopen(inp, "rb", buffering=0), os.fdopen(out, "wb")


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


class Channel:
    """The worker's end of its socket. While an invocation runs, `ask` sends the front end a
    request (an `Ask`) and blocks for its answer: the val has no network or storage of its own.
    """

    def __init__(self, inp: BinaryIO, out: BinaryIO, tether: Tether | Untethered) -> None:
        self.inp = inp
        self.out = out
        self.decoder = FrameDecoder()
        #: Ends the worker when the front end hangs up while a val runs (sandbox.tether).
        self.tether = tether
        #: The id of the invocation being served (asks carry it); None between invocations.
        self.invocation: int | None = None
        #: An ask was interrupted between sending and its answer (a MemoryError, say): the
        #: answer may still be on its way, so the worker retires after this invocation.
        self.broken = False
        #: Requests the front end sent ahead (pipelining) that arrived while an ask waited
        #: for its answer: served in order, after this one.
        self.ahead: deque[Frame] = deque()

    def receive(self) -> Frame | None:
        if self.ahead:
            return self.ahead.popleft()
        return read_frame(self.inp, self.decoder)

    def _answer(self) -> Frame | None:
        """The next frame that is not a request sent ahead; those are kept for later."""
        while (frame := read_frame(self.inp, self.decoder)) is not None:
            if frame.op not in INVOCATION_OPS:
                return frame
            if len(self.ahead) >= MAX_PIPELINE_WINDOW:
                raise ProtocolError("the front end sent more requests ahead than its window")
            self.ahead.append(frame)
        return None

    def send(self, message: Reply | Loaded | Checked | Ask) -> None:
        if isinstance(message, Loaded | HttpResponse | Result | Failure):
            self.out.write(encode_reply(message))  # fitted to the wire, whatever the val did
            self.out.flush()
        else:
            write_frame(self.out, message.to_frame())

    def ask(self, ask: Ask, answer: type[M], /) -> M:
        if self.invocation is None and not isinstance(ask, ImportAsk):
            # While the module loads, the front end answers imports of vals only.
            raise ValError(
                "std functions work while the val handles a request, not while its module "
                "loads; call them inside the exported function"
            )
        ask_id = LOAD_ASK_ID if self.invocation is None else self.invocation
        self.broken = True
        with self.tether.paused():  # the answer makes the socket readable: not a hang-up
            self.send(replace(ask, id=ask_id))  # type: ignore[type-var]
            frame = self._answer()
        if frame is None:
            raise ProtocolError("the front end closed the socket while the val waited")
        result = parse(frame, answer)
        self.broken = False
        return result

    def ask_all(self, asks: Sequence[ImportAsk], answer: type[M], /) -> list[M]:
        """Several imports asked at once, then their answers read in order (sandbox.imports:
        the vals a module imports, before it runs). At most `imports.MAX_BATCH` asks."""
        ask_id = LOAD_ASK_ID if self.invocation is None else self.invocation
        self.broken = True
        with self.tether.paused():
            for ask in asks:
                self.send(replace(ask, id=ask_id))
            frames = [self._answer() for _ in asks]
        results = []
        for frame in frames:
            if frame is None:
                raise ProtocolError("the front end closed the socket while the val waited")
            results.append(parse(frame, answer))
        self.broken = False
        return results


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

    def failure(self, request_id: int, exc: BaseException) -> Failure:
        return describe(exc, self.filename, request_id, self.log.take())

    def too_large(self, request_id: int, size: int) -> Failure:
        message = (
            f"the response body of {size} bytes is over "
            f"the {self.limits.max_response_body_bytes}-byte limit"
        )
        return Failure(request_id, "response_too_large", message, log=self.log.take())

    def serve_call(self, call: Call) -> Reply:
        try:
            value = self.export()
            # Run always sends args (maybe none): a callable export is called, another
            # export is the result. Eval without args returns its value as it is.
            if call.args is not None and callable(value):
                value = value(*call.args)
            elif callable(value):
                raise ValError(
                    f"the value is a {type(value).__name__}, which is not JSON; send args "
                    "(maybe an empty list) to call it"
                )
            body = result_json(value)
        except BaseException as exc:  # the val's failure, whatever it raised, is one reply
            return self.failure(call.id, exc)
        if len(body) > self.limits.max_response_body_bytes:
            return self.too_large(call.id, len(body))
        return Result(call.id, body, self.log.take())

    def serve_scheduled(self, run: ScheduledRun) -> Reply:
        """A scheduled run: the export is called with an Interval; what it returns is
        dropped (nobody reads it), so it need not be JSON."""
        interval = Interval(run.scheduled_at, run.last_run_at, run.schedule)
        try:
            export = self.export()
            if not callable(export):
                raise ValError(
                    f"{self.name!r} is a {type(export).__name__}; a scheduled val must export "
                    "a function that takes an interval"
                )
            export(interval)
        except BaseException as exc:  # the val's failure, whatever it raised, is one reply
            return self.failure(run.id, exc)
        return Result(run.id, b"null", self.log.take())

    def serve_http(self, message: HttpRequest) -> Reply:
        try:
            # In the val's error handling: a query over the field limit is the request's
            # fault, answered as the val's error, never the worker's death.
            request = Request(
                method=message.method,
                url=message.url,
                path=message.path,
                query_string=message.query,
                headers=list(message.headers),
                body=message.body,
                limits=self.limits,
            )
            export = self.export()
            if not callable(export):
                raise ValError(
                    f"{self.name!r} is a {type(export).__name__}; an HTTP val must export "
                    "a function that takes a Request"
                )
            response = to_response(export(request))
            if len(response.body) > self.limits.max_response_body_bytes:
                return self.too_large(message.id, len(response.body))
        except BaseException as exc:  # the val's failure, whatever it raised, is one reply
            return self.failure(message.id, exc)
        headers = tuple((name, value) for name, value in response.header_pairs())
        return HttpResponse(message.id, response.status, headers, response.body, self.log.take())

    def serve(self, message: Invocation) -> Reply:
        if isinstance(message, HttpRequest):
            return self.serve_http(message)
        if isinstance(message, ScheduledRun):
            return self.serve_scheduled(message)
        return self.serve_call(message)


def make_importer(
    load: Load, name: str, channel: Channel, log: LogBuffer, modules: Mapping[str, Facade]
) -> ValImporter:
    """The worker's imports of other vals, run with the worker's env, log and `std`."""
    env = dict(load.env)

    def run(
        source: str, filename: str, module_name: str, hook: ModuleHook, prefetch: Prefetch
    ) -> tuple[dict[str, object], dict[str, object]]:
        return run_module(source, filename, module_name, env, log, modules, hook, prefetch)

    top = ValPath(load.owner, name, None) if load.mode != "eval" and load.owner else None
    return ValImporter(channel.ask, run, load.limits, top, channel.ask_all)


def load_export(
    load: Load,
    name: str,
    log: LogBuffer,
    modules: Mapping[str, Facade],
    importer: ValImporter | None = None,
) -> Callable[[], object]:
    """Compile the code (and run a val's module once); a function that gives the export."""
    check_source_size(load.source, load.limits.max_source_bytes)
    env = dict(load.env)

    def vals() -> ModuleHook | None:
        return importer.module_hook() if importer is not None else None

    if load.mode == "eval":
        compiled = compile_eval(load.source)
        return lambda: evaluate(compiled, env, log, modules, vals())
    prefetch = importer.prefetch if importer is not None else None
    val = load_val(load.source, name, env, log, modules, vals(), prefetch)
    return lambda: val.export


def serve(inp: BinaryIO, out: BinaryIO, *, confined: bool = False, tethered: bool = False) -> int:
    """Load one val, then serve it until EOF. `confined`: the process limits are in force
    already (the fork server's sandbox.confine set them); otherwise apply them here.
    `tethered`: `inp` is a socket whose hang-up ends the worker even while a val runs."""
    tether = Tether(inp.fileno()) if tethered else UNTETHERED
    channel = Channel(inp, out, tether)
    frame = channel.receive()
    if frame is None:
        return 0  # closed while generic: a spare worker at shutdown
    load = parse(frame, Load)
    limits = load.limits
    # Eval compiles as val_filename(EVAL_NAME), whatever name was sent.
    name = EVAL_NAME if load.mode == "eval" else load.name
    if not confined:
        apply_limits(limits)
    arm_cpu_limit(limits)
    log = LogBuffer(limits.max_log_bytes)
    modules = {"std": make_std(channel.ask, limits)}
    importer = make_importer(load, name, channel, log, modules)
    if load.mode == "check":  # checks at save: compile, report, exit; nothing of the val runs
        with tether:
            problems = check_source(load.source, name, limits.max_source_bytes, modules, importer)
        channel.send(Checked(tuple(problems)))
        return 0
    try:
        with tether:
            export = load_export(load, name, log, modules, importer)
    except BaseException as exc:  # a val that fails to load is one error reply, then exit
        channel.send(describe(exc, val_filename(name), None, log.take()))
        return 0
    worker = Worker(name, export, limits, log)
    channel.send(Loaded(log.take()))
    while (frame := channel.receive()) is not None:
        message = parse(frame, HttpRequest, Call, ScheduledRun)
        channel.invocation = message.id
        with tether:
            reply = worker.serve(message)
        channel.invocation = None
        # A worker that is out of memory or near its life's CPU budget says so and exits
        # after this reply; the front end never sends it another request.
        out_of_memory = isinstance(reply, Failure) and reply.type == "memory_limit"
        retire = out_of_memory or channel.broken or not arm_cpu_limit(limits)
        channel.send(replace(reply, retire=retire))
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
