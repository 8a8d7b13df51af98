"""Invoking vals: the Run (SPEC §4.2) and Eval (§4.3) APIs, and the web host's path to the pool.

`Runner.invoke` is the one path from a request to the pool (web, run, eval): it checks the
kind of reply, takes env values out of what the val logged or raised, and queues the
invocation's record. `RunApi` holds the handlers of `/v1/run` and `/v1/eval`, which decide who
may invoke what (`runtime.api.may_read`); the web host serves anyone. The parsing of their
input is pure and comes last.
"""

from __future__ import annotations

import json
import time
from typing import TypeVar
from urllib.parse import parse_qs

import trio

from runtime import strictjson
from runtime.api import check_names, may_read, optional_user, parse_version
from runtime.config import Config
from runtime.errors import (
    BadRequestError,
    ClientGoneError,
    HTTPError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UnauthorizedError,
    WorkerError,
)
from runtime.hosts import val_host
from runtime.http import JSON_HEADERS, HTTPRequest, HTTPResponse
from runtime.pool import Pool, ValSpec
from runtime.records import Recorder, loggable_path, mask_env
from runtime.reply import Reply, ValResponse, ValResult, protocol_error
from runtime.store import AsyncStore, Record, Store, User, ValVersion

Outcome = TypeVar("Outcome", ValResponse, ValResult)


def val_spec(val: ValVersion, env: dict[str, str], web_domain: str) -> ValSpec:
    return ValSpec(
        val_id=val.val_id,
        version=val.version,
        owner=val.owner,
        name=val.name,
        code=val.code,
        env=tuple(sorted(env.items())),
        host=val_host(val.owner, val.name, web_domain),
    )


def eval_spec(code: str, user: User | None, env: dict[str, str]) -> ValSpec:
    # No val: id and version 0 are never a val's (ids start at 1), and the worker is used
    # once (`Pool.invoke_once`), so they name no warm worker either.
    return ValSpec(
        val_id=0,
        version=0,
        owner=user.name if user else "",
        name="eval",
        code=code,
        env=tuple(sorted(env.items())),
        host="",
        mode="eval",
    )


def result_response(result: ValResult) -> HTTPResponse:
    return HTTPResponse(200, list(JSON_HEADERS), result.body, cors=True)


class Runner:
    def __init__(self, config: Config, pool: Pool, recorder: Recorder) -> None:
        self.config = config
        self.pool = pool
        self.recorder = recorder
        # Each Eval takes a fresh worker; at most as many at once as the pool keeps warm.
        self._eval_slots = trio.Semaphore(config.pool.max_workers)

    async def invoke(
        self,
        spec: ValSpec,
        head: dict[str, object],
        body: bytes,
        *,
        source: str,
        expect: type[Outcome],
        request: HTTPRequest | None = None,
    ) -> Outcome:
        """Invoke through the pool and record it; the outcome, or the val's error raised.
        `request` is what asked for it (its method and path go in the record)."""
        started_at, started = time.time(), trio.current_time()

        def record(status: int, log: str = "", error: HTTPError | None = None) -> None:
            steps = error.details.get("traceback") if error else None
            self.recorder.add(
                Record(
                    val_id=None if spec.mode == "eval" else spec.val_id,
                    owner=spec.owner or None,
                    source=source,
                    version=None if spec.mode == "eval" else spec.version,
                    started_at=started_at,
                    duration_ms=(trio.current_time() - started) * 1000,
                    status=status,
                    log=mask_env(log, spec.env),
                    error_type=error.type if error else None,
                    error_message=error.message if error else None,
                    traceback=tuple(map(str, steps)) if isinstance(steps, list) else None,
                    method=request.method if request else None,
                    path=loggable_path(request.raw_path) if request else None,
                )
            )

        try:
            if spec.mode == "eval":
                reply = await self._invoke_once(spec, head, body)
            else:
                reply = await self.pool.invoke(spec, head, body)
        except HTTPError as exc:
            error = _masked(exc, spec)
            record(error.status, error.log if isinstance(error, WorkerError) else "", error)
            raise error from None
        except trio.Cancelled:  # the service is stopping under this request
            gone = ClientGoneError("cancelled: valrun was shutting down", "cancelled")
            record(gone.status, error=gone)
            raise
        outcome = reply.outcome
        if isinstance(outcome, WorkerError):
            error = _masked(outcome, spec)
            record(error.status, reply.log, error)
            raise error
        if not isinstance(outcome, expect):
            # The pool already refuses (and kills) a worker that answers with the wrong kind
            # of reply; this guards the Runner's own contract.
            error = protocol_error(f"a {type(outcome).__name__} where a {expect.__name__} was due")
            record(error.status, error=error)
            raise error
        record(outcome.status if isinstance(outcome, ValResponse) else 200, reply.log)
        return outcome

    async def _invoke_once(self, spec: ValSpec, head: dict[str, object], body: bytes) -> Reply:
        try:
            self._eval_slots.acquire_nowait()
        except trio.WouldBlock:
            raise OverloadedError(
                f"{self.config.pool.max_workers} evals are running; retry shortly",
                headers=(("retry-after", "1"),),
            ) from None
        try:
            return await self.pool.invoke_once(spec, head, body)
        finally:
            self._eval_slots.release()

    async def run(
        self,
        val: ValVersion,
        env: dict[str, str],
        args: list[object],
        request: HTTPRequest | None = None,
    ) -> HTTPResponse:
        spec = val_spec(val, env, self.config.server.web_domain)
        result = await self.invoke(
            spec,
            {"op": "call"},
            encode_args(args),
            source="run",
            expect=ValResult,
            request=request,
        )
        return result_response(result)

    async def eval(
        self,
        code: str,
        args: list[object] | None,
        user: User | None,
        env: dict[str, str],
        request: HTTPRequest | None = None,
    ) -> HTTPResponse:
        body = b"" if args is None else encode_args(args)
        result = await self.invoke(
            eval_spec(code, user, env),
            {"op": "call"},
            body,
            source="eval",
            expect=ValResult,
            request=request,
        )
        return result_response(result)


class RunApi:
    """The handlers of the Run and Eval routes (see `runtime.api.ROUTES`)."""

    def __init__(self, config: Config, store: AsyncStore, runner: Runner) -> None:
        self.config = config
        self.store = store
        self.runner = runner

    async def run_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = run_target(params["target"])
        caller = await optional_user(self.store, request)
        args = run_args(request)
        version = parse_version(request.query_string)
        resolved = await self.store.resolve(owner, name, version)
        if resolved is None or not may_read(resolved[0], caller):
            # Also for a private val that is not the caller's: its existence is not revealed.
            raise NotFoundError(
                f"no val {owner}.{name}" + (f" version {version}" if version else "")
            )
        val, env = resolved
        return await self.runner.run(val, env, args, request)

    async def eval_code(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        caller = await optional_user(self.store, request)
        if caller is None and not self.config.server.anonymous_eval:
            raise UnauthorizedError(
                "the Eval API needs a token: send 'Authorization: Bearer <token>'"
            )
        code, args = eval_input(request, params.get("code"))
        check_code_size(code, self.config.limits.max_source_bytes)
        env = await self.store.run(Store.env, caller.name) if caller else {}
        return await self.runner.eval(code, args, caller, env, request)

    async def preflight(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        # The CORS finalizer adds the allowed origin and methods and mirrors the headers.
        return HTTPResponse(204, cors=True)


def _masked(error: HTTPError, spec: ValSpec) -> HTTPError:
    """The val's own error with env values taken out; valrun's own errors hold none."""
    if not isinstance(error, WorkerError):
        return error
    message = mask_env(error.message, spec.env)
    if message == error.message:
        return error
    masked = WorkerError(message, error.type, headers=error.headers, details=error.details)
    masked.log = error.log
    return masked


# Input: pure.


def run_target(target: str) -> tuple[str, str]:
    """`alice.hello` -> ("alice", "hello")."""
    user, dot, val = target.partition(".")
    if not dot:
        raise BadRequestError(f"expected /v1/run/USER.VAL, not {target!r}", "bad_name")
    check_names(user, val)
    return user, val


def encode_args(args: list[object]) -> bytes:
    # ASCII escapes: a lone surrogate a client sent as "\ud800" stays valid on the wire.
    return json.dumps(args, separators=(",", ":")).encode()


def _loads(text: bytes | str, what: str) -> object:
    try:
        return strictjson.loads(text)
    except ValueError as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}", "bad_json") from None


def _args_array(value: object) -> list[object]:
    if not isinstance(value, list):
        raise BadRequestError(
            f'args must be a JSON array (like [1, "two"]), not a JSON {_json_type(value)}',
            "bad_args",
        )
    return value


def _json_type(value: object) -> str:
    names = {dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def query_args(query_string: str) -> list[object] | None:
    """`?args=<JSON array>`; None when absent or empty."""
    values = parse_qs(query_string, keep_blank_values=True).get("args")
    if not values or not values[0].strip():
        return None
    return _args_array(_loads(values[0], "?args"))


def run_args(request: HTTPRequest) -> list[object]:
    """Run's args: `?args=` on GET; on POST a body `{"args": [...]}` or a bare JSON array."""
    if request.method != "POST":
        return query_args(request.query_string) or []
    if query_args(request.query_string) is not None:
        raise BadRequestError("on POST, send args in the body, not in ?args=", "bad_args")
    if not request.body.strip():
        return []
    body = _loads(request.body, "the request body")
    if isinstance(body, dict):
        unknown = set(body) - {"args"}
        if unknown:
            raise BadRequestError(
                f'unknown field(s) {", ".join(sorted(unknown))}: send {{"args": [...]}}'
            )
        return _args_array(body.get("args", []))
    return _args_array(body)


def eval_input(request: HTTPRequest, path_code: str | None) -> tuple[str, list[object] | None]:
    """Eval's code and args (None: not given, so a callable value is not called)."""
    if request.method != "POST":
        code, args = path_code or "", query_args(request.query_string)
    else:
        body = _loads(request.body, "the request body")
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            raise BadRequestError('send {"code": "...", "args": [...]} ("args" is optional)')
        unknown = set(body) - {"code", "args"}
        if unknown:
            raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
        code = body["code"]
        args = _args_array(body["args"]) if "args" in body else None
    if not code.strip():
        raise BadRequestError("the code to evaluate is empty")
    return code, args


def check_code_size(code: str, max_bytes: int) -> None:
    if len(code.encode("utf-8", errors="replace")) > max_bytes:
        raise PayloadTooLargeError(f"the code is over the {max_bytes}-byte limit")
