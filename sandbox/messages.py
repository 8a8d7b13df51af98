"""The wire messages: one frozen dataclass per kind, the one contract both trust zones share.

`sandbox.wire` moves frames (a JSON head and a raw body); this module says what a frame may
mean. As h11's events do, each message checks itself when it is built from a frame
(`from_frame`: types, sizes, allowed values) and turns itself into one (`to_frame`). A frame
that is not a valid message of a kind the reader expects raises `MessageError`, a
`ProtocolError`: the peer is broken or lying, and is never trusted again. Both sides build and
read frames only through these classes. Standard library only: the worker imports it.

Front end -> worker::

    Load          name, mode, env, limits           body: the val's source (UTF-8)
    HttpRequest   id, method, url, path, query, headers    body: the request body
    Call          id                                body: the args (a JSON array), or empty
                                                          for "do not call" (Eval without args)
    ScheduledRun  id, scheduled_at, last_run_at, schedule   (op `cron`: a scheduled run)
    <answers>     id, ...                           the answer to a worker's ask (below)
    Fetched       id, status, url, headers, error   body: the response body

Worker -> front end::

    Loaded        log                               (the val is loaded; a failed load is a
                                                    Failure with no id, then the worker exits)
    Checked       problems                          (the answer to a `check` Load, then exit)
    HttpResponse  id, status, headers, log, retire  body: the response body
    Result        id, log, retire                   body: the value as UTF-8 JSON
    Failure       id (None for a load), type, message, traceback, log, retire
    <asks>        id, ...                           the val asks the front end to do something
                                                    for it (fetch, storage) while request `id`
                                                    runs; the worker blocks for the answer
    FetchAsk      id, method, url, headers, timeout_s, follow_redirects
                                                    body: the request body
    BlobAsk       id, action, key, after, limit     body: the value (set)
    SqlAsk        id, batch                         body: statements, JSON [[sql, [args]], ...]
    ImportAsk     id, user, val, version            (an import of another val; also while
                                                    the module loads, with id LOAD_ASK_ID;
                                                    up to 16 may be sent before their answers)

Front end -> worker, answers to asks::

    Fetched       id, status, url, headers, error   body: the response body
    BlobAnswer    id, found, error                  body: the value (get), entries (list)
    SqlAnswer     id, error                         body: results, JSON [{columns, rows, ...}]
    ImportAnswer  id, owner, name, version, error   body: the imported val's source (UTF-8)

What a message checks is what a frame can get wrong on its own. What depends on the front end's
configuration (status ranges, header syntax and size limits, cookie domains) is the front end's
policy, applied after parsing in `runtime.reply`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, Self, TypeAlias, TypeVar, cast, get_args, overload

from sandbox.limits import WorkerLimits
from sandbox.wire import Frame, ProtocolError

#: How a worker runs its code: `module` runs a val's module once and serves its export;
#: `eval` compiles statements and a final expression, run afresh on each call (the Eval API);
#: `check` only compiles and checks it (checks at save), answers `Checked` and exits.
Mode = Literal["module", "eval", "check"]
#: What a worker may report as the reason a val failed; anything else is a protocol error.
FailureType = Literal["val_error", "memory_limit", "response_too_large"]
HeaderPairs: TypeAlias = tuple[tuple[str, str], ...]

MODES: frozenset[str] = frozenset(get_args(Mode))
FAILURE_TYPES: frozenset[str] = frozenset(get_args(FailureType))


class MessageError(ProtocolError):
    """A frame that is not a valid message of a kind the reader expects."""


class ValueRefusedError(MessageError):
    """A well-formed message carrying a value the protocol does not allow, which a val could
    have asked for (an HTTP status outside 200-599): the val's error more than the worker's."""


# Field readers: each names the field it refuses, so a broken peer's log line says what broke.


def _get(head: Mapping[str, object], key: str, kind: type, default: object = ...) -> object:
    value = head.get(key, default)
    if value is ...:
        raise MessageError(f"{head.get('op')!r} message without {key!r}")
    # `type(...) is`: a bool is an int to isinstance, and JSON gives no subclasses anyway.
    if type(value) is not kind:
        raise MessageError(f"{key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _str(head: Mapping[str, object], key: str, default: object = ...) -> str:
    return cast(str, _get(head, key, str, default))


def _int(head: Mapping[str, object], key: str) -> int:
    return cast(int, _get(head, key, int))


def _bool(head: Mapping[str, object], key: str) -> bool:
    return cast(bool, _get(head, key, bool, False))


def _pairs(head: Mapping[str, object], key: str) -> HeaderPairs:
    raw = head.get(key)
    if not isinstance(raw, list):
        raise MessageError(f"{key!r} is not a list")
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(s) is str for s in pair)):
            raise MessageError(f"an item of {key!r} is not a [name, value] pair of strings")
    return tuple((name, value) for name, value in raw)


def _strings(head: Mapping[str, object], key: str) -> tuple[str, ...]:
    raw = head.get(key, [])
    if not isinstance(raw, list) or not all(type(s) is str for s in raw):
        raise MessageError(f"{key!r} is not a list of strings")
    return tuple(raw)


def _check_op(frame: Frame, op: str) -> None:
    if frame.op != op:
        raise MessageError(f"a {frame.op!r} frame is not a {op!r} message")


# Front end -> worker


@dataclass(frozen=True, slots=True)
class Load:
    """Become one val version with one env: compile (and for a module, run) `source`."""

    op: ClassVar[str] = "load"
    name: str
    source: str
    mode: Mode = "module"
    env: HeaderPairs = ()
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    #: The val's owner ("" for an anonymous Eval): an import of the val itself is a cycle.
    owner: str = ""

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "name": self.name,
            "owner": self.owner,
            "mode": self.mode,
            "env": dict(self.env),
            "limits": self.limits.to_head(),
        }
        return Frame(head, self.source.encode("utf-8", errors="surrogatepass"))

    @classmethod
    def from_frame(cls, frame: Frame) -> Load:
        _check_op(frame, cls.op)
        head = frame.head
        mode = _str(head, "mode", "module")
        if mode not in MODES:
            raise MessageError(f"unknown mode {mode!r}")
        env = head.get("env") or {}
        if not isinstance(env, dict) or not all(type(v) is str for v in env.values()):
            raise MessageError("'env' must map names to strings")
        try:
            limits = WorkerLimits.from_head(head.get("limits"))
        except ValueError as exc:
            raise MessageError(str(exc)) from None
        return cls(
            name=_str(head, "name"),
            source=frame.body.decode("utf-8", errors="replace"),
            mode=mode,  # type: ignore[arg-type]  # checked against MODES above
            env=tuple(env.items()),
            limits=limits,
            owner=_str(head, "owner", ""),
        )


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request to a val's web host, for its export."""

    op: ClassVar[str] = "http"
    id: int
    method: str
    url: str
    path: str
    query: str
    headers: HeaderPairs
    body: bytes = field(default=b"", repr=False)

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "id": self.id,
            "method": self.method,
            "url": self.url,
            "path": self.path,
            "query": self.query,
            "headers": [list(pair) for pair in self.headers],
        }
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> HttpRequest:
        _check_op(frame, cls.op)
        head = frame.head
        return cls(
            id=_int(head, "id"),
            method=_str(head, "method"),
            url=_str(head, "url"),
            path=_str(head, "path"),
            query=_str(head, "query"),
            headers=_pairs(head, "headers"),
            body=frame.body,
        )


@dataclass(frozen=True, slots=True)
class Call:
    """Call the export with `args` (Run, Eval); `args=None`: the export's value as it is."""

    op: ClassVar[str] = "call"
    id: int
    args: list[object] | None = None

    def to_frame(self) -> Frame:
        # ASCII escapes: a lone surrogate a client sent as "\ud800" stays valid on the wire.
        body = b"" if self.args is None else json.dumps(self.args, separators=(",", ":")).encode()
        return Frame({"op": self.op, "id": self.id}, body)

    @classmethod
    def from_frame(cls, frame: Frame) -> Call:
        _check_op(frame, cls.op)
        args = None
        if frame.body:
            try:
                args = json.loads(frame.body)
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise MessageError("'call' args are not JSON") from None
            if not isinstance(args, list):
                raise MessageError("'call' args are not a JSON array")
        return cls(id=_int(frame.head, "id"), args=args)


@dataclass(frozen=True, slots=True)
class ScheduledRun:
    """A scheduled run (a cron or interval tick): the export is called with an interval
    object of these fields; what it returns is dropped, so it need not be JSON."""

    op: ClassVar[str] = "cron"
    id: int
    #: The tick this run is for, as Unix time.
    scheduled_at: float
    #: When the schedule last ran, or None before its first run.
    last_run_at: float | None
    #: The schedule: a cron expression, or `@every 300s`.
    schedule: str

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "id": self.id,
            "scheduled_at": self.scheduled_at,
            "last_run_at": self.last_run_at,
            "schedule": self.schedule,
        }
        return Frame(head)

    @classmethod
    def from_frame(cls, frame: Frame) -> ScheduledRun:
        _check_op(frame, cls.op)
        head = frame.head
        return cls(
            id=_int(head, "id"),
            scheduled_at=_time(head, "scheduled_at"),
            last_run_at=None if head.get("last_run_at") is None else _time(head, "last_run_at"),
            schedule=_str(head, "schedule"),
        )


def _time(head: Mapping[str, object], key: str) -> float:
    value = head.get(key)
    if type(value) not in (int, float) or not 0 <= cast(float, value) < 2**40:
        raise MessageError(f"{key!r} is not a Unix time")
    return float(cast(float, value))


Invocation: TypeAlias = HttpRequest | Call | ScheduledRun
INVOCATION_OPS = frozenset((HttpRequest.op, Call.op, ScheduledRun.op))
#: The most requests the front end may send a worker ahead of their replies (pipelining,
#: `pool.pipeline_window`); a worker holds at most this many unread while a val waits for
#: the answer to an ask, and refuses more as a protocol error.
MAX_PIPELINE_WINDOW = 32


# Worker -> front end


@dataclass(frozen=True, slots=True)
class Loaded:
    op: ClassVar[str] = "loaded"
    log: str = ""

    def to_frame(self) -> Frame:
        return Frame({"op": self.op, "log": self.log})

    @classmethod
    def from_frame(cls, frame: Frame) -> Loaded:
        _check_op(frame, cls.op)
        return cls(log=_str(frame.head, "log", ""))


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What an HTTP val answered."""

    op: ClassVar[str] = "response"
    id: int
    status: int
    headers: HeaderPairs = ()
    body: bytes = field(default=b"", repr=False)
    log: str = ""
    #: The worker is done after this reply (out of memory, CPU budget spent): it exits.
    retire: bool = False

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "id": self.id,
            "status": self.status,
            "headers": [list(pair) for pair in self.headers],
            "log": self.log,
            "retire": self.retire,
        }
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> HttpResponse:
        _check_op(frame, cls.op)
        head = frame.head
        status = head.get("status")
        # 1xx would confuse the client's connection; the worker's Response refuses it too.
        if type(status) is not int or not 200 <= status <= 599:
            raise ValueRefusedError(f"the val answered with status {status!r}; allowed: 200-599")
        return cls(
            id=_int(head, "id"),
            status=status,
            headers=_pairs(head, "headers"),
            body=frame.body,
            log=_str(head, "log", ""),
            retire=_bool(head, "retire"),
        )


@dataclass(frozen=True, slots=True)
class Result:
    """What a Run or Eval call returned, as UTF-8 JSON made inside the worker."""

    op: ClassVar[str] = "result"
    id: int
    body: bytes = field(default=b"null", repr=False)
    log: str = ""
    retire: bool = False

    def to_frame(self) -> Frame:
        head = {"op": self.op, "id": self.id, "log": self.log, "retire": self.retire}
        return Frame(dict(head), self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> Result:
        _check_op(frame, cls.op)
        head = frame.head
        return cls(
            id=_int(head, "id"),
            body=frame.body,
            log=_str(head, "log", ""),
            retire=_bool(head, "retire"),
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """The val failed: it raised, ran out of memory, or answered too much. `id` is None for a
    failed load."""

    op: ClassVar[str] = "error"
    id: int | None
    type: FailureType
    message: str
    traceback: tuple[str, ...] = ()
    log: str = ""
    retire: bool = False

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "type": self.type,
            "message": self.message,
            "traceback": list(self.traceback),
            "log": self.log,
            "retire": self.retire,
        }
        if self.id is not None:
            head["id"] = self.id
        return Frame(head)

    @classmethod
    def from_frame(cls, frame: Frame) -> Failure:
        _check_op(frame, cls.op)
        head = frame.head
        kind = _str(head, "type")
        if kind not in FAILURE_TYPES:
            raise MessageError(f"unknown failure type {kind!r}")
        return cls(
            id=_int(head, "id") if "id" in head else None,
            type=kind,  # type: ignore[arg-type]  # checked against FAILURE_TYPES above
            message=_str(head, "message"),
            traceback=_strings(head, "traceback"),
            log=_str(head, "log", ""),
            retire=_bool(head, "retire"),
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """What would stop a val from loading: a line (None: the whole source) and what to
    change."""

    line: int | None
    message: str

    MAX_LINE: ClassVar[int] = 10_000_000
    MAX_MESSAGE_CHARS: ClassVar[int] = 1000

    def to_json(self) -> dict[str, object]:
        return {"line": self.line, "message": self.message[: self.MAX_MESSAGE_CHARS]}

    @classmethod
    def from_json(cls, raw: object) -> Problem:
        if not isinstance(raw, dict) or set(raw) != {"line", "message"}:
            raise MessageError("a problem is not {line, message}")
        line, message = raw["line"], raw["message"]
        if not (line is None or (type(line) is int and 1 <= line <= cls.MAX_LINE)):
            raise MessageError("a problem's line is not a line number")
        if type(message) is not str:
            raise MessageError("a problem's message is not a string")
        return cls(line, message[: cls.MAX_MESSAGE_CHARS])


@dataclass(frozen=True, slots=True)
class Checked:
    """The answer to a `check` Load: every problem found (none: the code would load)."""

    op: ClassVar[str] = "checked"
    problems: tuple[Problem, ...] = ()

    #: Problems reported at most: a nesting bomb repeats the same one thousands of times.
    MAX_PROBLEMS: ClassVar[int] = 20

    def to_frame(self) -> Frame:
        problems = [p.to_json() for p in self.problems[: self.MAX_PROBLEMS]]
        return Frame({"op": self.op, "problems": problems})

    @classmethod
    def from_frame(cls, frame: Frame) -> Checked:
        _check_op(frame, cls.op)
        raw = frame.head.get("problems")
        if not isinstance(raw, list) or len(raw) > cls.MAX_PROBLEMS:
            raise MessageError(f"'problems' is not a list of at most {cls.MAX_PROBLEMS}")
        return cls(tuple(Problem.from_json(p) for p in raw))


Reply: TypeAlias = HttpResponse | Result | Failure

#: What answers each kind of invocation (or a Failure).
REPLY_TO: dict[type[Invocation], type[HttpResponse] | type[Result]] = {
    HttpRequest: HttpResponse,
    Call: Result,
    ScheduledRun: Result,
}


class _Message(Protocol):
    op: ClassVar[str]

    def to_frame(self) -> Frame: ...

    @classmethod
    def from_frame(cls, frame: Frame) -> Self: ...


M = TypeVar("M", bound=_Message)
M1 = TypeVar("M1", bound=_Message)
M2 = TypeVar("M2", bound=_Message)
M3 = TypeVar("M3", bound=_Message)


class Ask(_Message, Protocol):
    """What a val asks the front end to do for it while invocation `id` runs (outbound HTTP,
    storage): the worker sends it and blocks until the front end sends the answer."""

    # Read-only, so that frozen dataclasses are asks.
    @property
    def id(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FetchAsk:
    """`std.fetch`: make this HTTP request for the val (the front end applies the egress
    policy and the owner's limits). The request body travels as the frame's body."""

    op: ClassVar[str] = "fetch"
    id: int
    method: str
    url: str
    headers: HeaderPairs = ()
    body: bytes = field(default=b"", repr=False)
    #: The val's own timeout, if it gave one; the front end caps it.
    timeout_s: float | None = None
    follow_redirects: bool = True

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "id": self.id,
            "method": self.method,
            "url": self.url,
            "headers": [list(pair) for pair in self.headers],
            "timeout_s": self.timeout_s,
            "follow_redirects": self.follow_redirects,
        }
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> FetchAsk:
        _check_op(frame, cls.op)
        head = frame.head
        timeout = head.get("timeout_s")
        if timeout is not None and (
            type(timeout) not in (int, float) or not 0 < cast(float, timeout) < float("inf")
        ):
            raise MessageError(f"'timeout_s' {timeout!r} is not a positive number")
        return cls(
            id=_int(head, "id"),
            method=_str(head, "method"),
            url=_str(head, "url"),
            headers=_pairs(head, "headers"),
            body=frame.body,
            timeout_s=None if timeout is None else float(cast(float, timeout)),
            follow_redirects=_bool(head, "follow_redirects"),
        )


@dataclass(frozen=True, slots=True)
class Fetched:
    """The answer to a FetchAsk: the response (its body as the frame's body), or `error`, the
    message of the FetchError the val gets (status 0 then)."""

    op: ClassVar[str] = "fetched"
    id: int
    status: int = 0
    url: str = ""
    headers: HeaderPairs = ()
    body: bytes = field(default=b"", repr=False)
    error: str | None = None

    def to_frame(self) -> Frame:
        head: dict[str, object] = {
            "op": self.op,
            "id": self.id,
            "status": self.status,
            "url": self.url,
            "headers": [list(pair) for pair in self.headers],
            "error": self.error,
        }
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> Fetched:
        _check_op(frame, cls.op)
        head = frame.head
        error = head.get("error")
        if error is not None and type(error) is not str:
            raise MessageError("'error' is not a string")
        status = _int(head, "status")
        if (error is None) != (100 <= status <= 999):
            raise MessageError(f"'fetched' with status {status} and error {error!r}")
        return cls(
            id=_int(head, "id"),
            status=status,
            url=_str(head, "url"),
            headers=_pairs(head, "headers"),
            body=frame.body,
            error=error,
        )


# Storage asks (sandbox.storage makes them; runtime.storage answers them). Values travel as
# raw frame bodies: a blob's bytes as they are, SQL statements and results as JSON in which a
# bytes value is the object {"$b": "<base64>"} (SQL values are never objects otherwise).

BlobAction = Literal["get", "set", "delete", "list"]
BLOB_ACTIONS: frozenset[str] = frozenset(get_args(BlobAction))
#: A SQL value as SQLite stores it.
SqlValue: TypeAlias = int | float | str | bytes | None
Statement: TypeAlias = tuple[str, tuple[SqlValue, ...]]


@dataclass(frozen=True, slots=True)
class BlobAsk:
    """`blob.get/set/delete/list`. `key` is the prefix for `list`, which answers at most
    `limit` entries with keys after `after`; `body` is the value for `set`."""

    op: ClassVar[str] = "blob"
    id: int
    action: BlobAction
    key: str
    after: str = ""
    limit: int = 0
    body: bytes = field(default=b"", repr=False)

    def to_frame(self) -> Frame:
        head: dict[str, object] = {"op": self.op, "id": self.id, "action": self.action}
        head.update(key=self.key, after=self.after, limit=self.limit)
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> BlobAsk:
        _check_op(frame, cls.op)
        head = frame.head
        action = _str(head, "action")
        if action not in BLOB_ACTIONS:
            raise MessageError(f"unknown blob action {action!r}")
        return cls(
            id=_int(head, "id"),
            action=action,  # type: ignore[arg-type]  # checked against BLOB_ACTIONS above
            key=_str(head, "key"),
            after=_str(head, "after", ""),
            limit=_int(head, "limit"),
            body=frame.body,
        )


@dataclass(frozen=True, slots=True)
class SqlAsk:
    """`sqlite.execute` (one statement) or `sqlite.batch` (several, in one transaction)."""

    op: ClassVar[str] = "sql"
    id: int
    statements: tuple[Statement, ...]
    batch: bool = False

    def to_frame(self) -> Frame:
        body = [[sql, [sql_value_to_json(v) for v in args]] for sql, args in self.statements]
        return Frame({"op": self.op, "id": self.id, "batch": self.batch}, _dumps(body))

    @classmethod
    def from_frame(cls, frame: Frame) -> SqlAsk:
        _check_op(frame, cls.op)
        raw = _loads(frame.body, "'sql' statements")
        if not isinstance(raw, list):
            raise MessageError("'sql' statements are not a JSON array")
        statements = []
        for item in raw:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and type(item[0]) is str
                and isinstance(item[1], list)
            ):
                raise MessageError("a 'sql' statement is not a [sql, [args]] pair")
            statements.append((item[0], tuple(sql_value_from_json(v) for v in item[1])))
        return cls(
            id=_int(frame.head, "id"),
            statements=tuple(statements),
            batch=_bool(frame.head, "batch"),
        )


@dataclass(frozen=True, slots=True)
class StorageFault:
    """Why a storage ask was refused: `type` (quota_exceeded, sql_error, ...) and a message
    for the val's `StorageError`."""

    type: str
    message: str


def _fault_head(fault: StorageFault | None) -> dict[str, object]:
    return {} if fault is None else {"error": {"type": fault.type, "message": fault.message}}


def _fault(head: Mapping[str, object]) -> StorageFault | None:
    raw = head.get("error")
    if raw is None:
        return None
    if not (
        isinstance(raw, dict) and type(raw.get("type")) is str and type(raw.get("message")) is str
    ):
        raise MessageError("'error' is not a {type, message} object")
    return StorageFault(raw["type"], raw["message"])


@dataclass(frozen=True, slots=True)
class BlobAnswer:
    """`found`: the key existed (get, delete). `body`: the value (get) or, for `list`, a JSON
    array of {key, size, updated_at}."""

    op: ClassVar[str] = "blob_answer"
    id: int
    found: bool = False
    body: bytes = field(default=b"", repr=False)
    error: StorageFault | None = None

    def to_frame(self) -> Frame:
        head = {"op": self.op, "id": self.id, "found": self.found, **_fault_head(self.error)}
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> BlobAnswer:
        _check_op(frame, cls.op)
        head = frame.head
        return cls(_int(head, "id"), _bool(head, "found"), frame.body, _fault(head))


@dataclass(frozen=True, slots=True)
class SqlResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[SqlValue, ...], ...]
    rows_affected: int
    last_insert_rowid: int

    def to_json(self) -> dict[str, object]:
        return {
            "columns": list(self.columns),
            "rows": [[sql_value_to_json(v) for v in row] for row in self.rows],
            "rows_affected": self.rows_affected,
            "last_insert_rowid": self.last_insert_rowid,
        }

    @classmethod
    def from_json(cls, raw: object) -> SqlResult:
        if not isinstance(raw, dict):
            raise MessageError("a SQL result is not an object")
        columns, rows = raw.get("columns"), raw.get("rows")
        if not (isinstance(columns, list) and all(type(c) is str for c in columns)):
            raise MessageError("a SQL result's 'columns' are not strings")
        if not (isinstance(rows, list) and all(isinstance(r, list) for r in rows)):
            raise MessageError("a SQL result's 'rows' are not lists")
        return cls(
            columns=tuple(columns),
            rows=tuple(tuple(sql_value_from_json(v) for v in row) for row in rows),
            rows_affected=_int(raw, "rows_affected"),
            last_insert_rowid=_int(raw, "last_insert_rowid"),
        )


def encode_sql_results(results: Sequence[SqlResult]) -> bytes:
    return _dumps([result.to_json() for result in results])


@dataclass(frozen=True, slots=True)
class SqlAnswer:
    """One result per statement, or the error that undid them all. The body is the results'
    JSON (`encode_sql_results`): the front end makes it once, to check its size."""

    op: ClassVar[str] = "sql_answer"
    id: int
    body: bytes = field(default=b"[]", repr=False)
    error: StorageFault | None = None

    def to_frame(self) -> Frame:
        return Frame({"op": self.op, "id": self.id, **_fault_head(self.error)}, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> SqlAnswer:
        _check_op(frame, cls.op)
        return cls(_int(frame.head, "id"), frame.body, _fault(frame.head))

    def results(self) -> list[SqlResult]:
        raw = _loads(self.body, "'sql_answer' results")
        if not isinstance(raw, list):
            raise MessageError("'sql_answer' results are not a JSON array")
        return [SqlResult.from_json(item) for item in raw]


def sql_value_to_json(value: SqlValue) -> object:
    if isinstance(value, bytes):
        return {"$b": base64.b64encode(value).decode("ascii")}
    return value


def sql_value_from_json(value: object) -> SqlValue:
    if isinstance(value, dict):
        text = value.get("$b")
        if len(value) != 1 or type(text) is not str:
            raise MessageError('a SQL value that is an object must be {"$b": "<base64>"}')
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:
            raise MessageError("a SQL bytes value is not base64") from None
    if value is None or type(value) in (int, float, str):
        return cast(SqlValue, value)
    if type(value) is bool:
        return int(value)  # a bool: JSON true and false
    raise MessageError(f"a SQL value cannot be a JSON {type(value).__name__}")


def _dumps(value: object) -> bytes:
    # NaN and Infinity pass: both ends are Python, and SQLite stores infinite REALs.
    return json.dumps(value, separators=(",", ":")).encode()


def _loads(body: bytes, what: str) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageError(f"{what} are not JSON") from None


#: The id of an ask made while the module loads (or is checked): invocation ids start at 1.
LOAD_ASK_ID = 0


@dataclass(frozen=True, slots=True)
class ImportAsk:
    """`from vals.USER.VAL import NAME`: the source of that val (its latest version, or
    `version`), if the worker's user may import it (runtime.imports decides)."""

    op: ClassVar[str] = "import"
    id: int
    user: str
    val: str
    version: int | None = None

    def to_frame(self) -> Frame:
        head = {"op": self.op, "id": self.id, "user": self.user, "val": self.val}
        return Frame({**head, "version": self.version})

    @classmethod
    def from_frame(cls, frame: Frame) -> ImportAsk:
        _check_op(frame, cls.op)
        head = frame.head
        version = head.get("version")
        if version is not None and (type(version) is not int or not 0 < version < 2**31):
            raise MessageError(f"'version' {version!r} is not a version number")
        return cls(_int(head, "id"), _str(head, "user"), _str(head, "val"), version)


@dataclass(frozen=True, slots=True)
class ImportAnswer:
    """The imported val: its owner and name as spelled when it was created, the version
    answered, and its source as the body; or `error`, the ImportError's message."""

    op: ClassVar[str] = "import_answer"
    id: int
    owner: str = ""
    name: str = ""
    version: int = 0
    body: bytes = field(default=b"", repr=False)
    error: str | None = None

    def to_frame(self) -> Frame:
        head: dict[str, object] = {"op": self.op, "id": self.id, "owner": self.owner}
        head.update(name=self.name, version=self.version, error=self.error)
        return Frame(head, self.body)

    @classmethod
    def from_frame(cls, frame: Frame) -> ImportAnswer:
        _check_op(frame, cls.op)
        head = frame.head
        error = head.get("error")
        if error is not None and type(error) is not str:
            raise MessageError("'error' is not a string")
        version = _int(head, "version")
        if (error is None) != (version > 0):
            raise MessageError(f"'import_answer' with version {version} and error {error!r}")
        return cls(
            id=_int(head, "id"),
            owner=_str(head, "owner"),
            name=_str(head, "name"),
            version=version,
            body=frame.body,
            error=error,
        )

    @property
    def source(self) -> str:
        return self.body.decode("utf-8", errors="replace")


#: Every kind of ask; the front end answers each with a message of its own kind.
ASKS: tuple[type[Ask], ...] = (FetchAsk, BlobAsk, SqlAsk, ImportAsk)


@overload
def parse(frame: Frame, a: type[M1], /) -> M1: ...
@overload
def parse(frame: Frame, a: type[M1], b: type[M2], /) -> M1 | M2: ...
@overload
def parse(frame: Frame, a: type[M1], b: type[M2], c: type[M3], /) -> M1 | M2 | M3: ...
@overload
def parse(frame: Frame, *kinds: type[M]) -> M: ...


def parse(frame: Frame, *kinds: type[_Message]) -> _Message:
    """The frame as the one of `kinds` whose op it has; MessageError for any other frame."""
    for kind in kinds:
        if frame.op == kind.op:
            return kind.from_frame(frame)
    expected = " or ".join(repr(kind.op) for kind in kinds)
    raise MessageError(f"a {frame.op!r} message where {expected} was due")
