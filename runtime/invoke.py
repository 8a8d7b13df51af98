"""The invocation path: from a request that names a val (or Eval code) to its outcome.

`Invoker.invoke` is the one path to the pool, for every source (web, run, eval): it builds the
worker's spec, sends the invocation, checks the kind of the reply, takes env values out of what
the val logged or raised, and queues the invocation's record. Who may invoke what is decided
before this module is called (`runtime.auth`); the web host serves anyone.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import TypeVar

import trio

from runtime.config import Config
from runtime.errors import (
    ClientGoneError,
    HTTPError,
    OverloadedError,
    TooManyRequestsError,
    WorkerError,
)
from runtime.fetch import FetchLog, fetch_log
from runtime.hosts import val_host
from runtime.http import JSON_HEADERS, HTTPRequest, HTTPResponse
from runtime.masking import mask_secrets
from runtime.pool import Pool, ValSpec
from runtime.records import Recorder, loggable_path
from runtime.reply import Reply, ValResponse, ValResult, protocol_error
from runtime.store import Record, Source, User, ValVersion
from sandbox.messages import Call, Invocation

Outcome = TypeVar("Outcome", ValResponse, ValResult)
#: How long an Eval over its user's cap waits for its 429: as long as its `Retry-After`.
REFUSAL_HOLD_S = 1.0


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


class Invoker:
    def __init__(self, config: Config, pool: Pool, recorder: Recorder) -> None:
        self.config = config
        self.pool = pool
        self.recorder = recorder
        # Each Eval takes a fresh worker; at most as many at once as the pool keeps warm,
        # and at most `max_evals_per_user` of one user's (anonymous callers are one user).
        self._eval_slots = trio.Semaphore(config.pool.max_workers)
        self._evals: Counter[str] = Counter()

    async def invoke(
        self,
        spec: ValSpec,
        request: Invocation,
        *,
        source: Source,
        expect: type[Outcome],
        origin: HTTPRequest | None = None,
        by_owner: bool = False,
    ) -> Outcome:
        """Invoke through the pool and record it; the outcome, or the val's error raised.
        `origin` is the HTTP request that asked for it (its method and path are recorded);
        `by_owner`: the caller is the val's owner, who is shown its load errors in full."""
        started_at, started = time.time(), trio.current_time()

        fetches = FetchLog()  # the invocation's own, from `fetch_log()` below

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
                    log=mask_secrets(log, spec.env),
                    error_type=error.type if error else None,
                    error_message=error.message if error else None,
                    traceback=tuple(map(str, steps)) if isinstance(steps, list) else None,
                    method=origin.method if origin else None,
                    path=loggable_path(origin.raw_path) if origin else None,
                    fetches=json.dumps(fetches.entries) if fetches.entries else "[]",
                )
            )

        try:
            with fetch_log() as fetches:
                if spec.mode == "eval":
                    reply = await self._invoke_once(spec, request)
                else:
                    reply = await self.pool.invoke(spec, request)
        except HTTPError as exc:
            error = _masked(exc, spec)
            record(error.status, error.log if isinstance(error, WorkerError) else "", error)
            raise (error if by_owner else shown_to_others(error, spec)) from None
        except trio.Cancelled:  # the client went away (runtime.abandon), or valrun is stopping
            gone = ClientGoneError(
                "cancelled: the client went away, or valrun was shutting down", "cancelled"
            )
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

    async def refuse_eval_if_full(self, owner: str) -> None:
        """What the Eval API asks first, before it parses the body or reads the env: refuse
        (429) an Eval of `owner` ("": anonymous) who has their most running, after holding
        the answer `REFUSAL_HOLD_S`. A refusal then costs no store trip, and a client that
        ignores `Retry-After` and asks again at once on each connection gets one refusal per
        connection a second, not as many as the front end's event loop can answer (which
        measured, left every other tenant's requests queued behind thousands a second)."""
        try:
            self.check_eval_room(owner)
        except TooManyRequestsError:
            await trio.sleep(REFUSAL_HOLD_S)
            raise

    def check_eval_room(self, owner: str) -> None:
        """Refuse (429) an Eval of `owner` ("": anonymous) who has their most running."""
        if self._evals[owner] >= self.config.pool.max_evals_per_user:
            raise TooManyRequestsError(
                f"{owner or 'anonymous'} has {self._evals[owner]} evals running, the most one "
                "user may have (pool.max_evals_per_user); retry shortly",
                headers=(("retry-after", "1"),),
                details={"limit": "pool.max_evals_per_user"},
            )

    async def _invoke_once(self, spec: ValSpec, request: Invocation) -> Reply:
        owner = spec.owner
        self.check_eval_room(owner)
        try:
            self._eval_slots.acquire_nowait()
        except trio.WouldBlock:
            raise OverloadedError(
                f"{self.config.pool.max_workers} evals are running; retry shortly",
                headers=(("retry-after", "1"),),
            ) from None
        self._evals[owner] += 1
        try:
            return await self.pool.invoke_once(spec, request)
        finally:
            self._eval_slots.release()
            self._evals[owner] -= 1
            if not self._evals[owner]:
                del self._evals[owner]

    async def run(
        self,
        val: ValVersion,
        env: dict[str, str],
        args: list[object],
        caller: User | None = None,
        origin: HTTPRequest | None = None,
    ) -> HTTPResponse:
        spec = val_spec(val, env, self.config.server.web_domain)
        by_owner = caller is not None and caller.name == val.owner
        result = await self.invoke(
            spec, Call(0, args), source="run", expect=ValResult, by_owner=by_owner, origin=origin
        )
        return result_response(result)

    async def eval(
        self,
        code: str,
        args: list[object] | None,
        user: User | None,
        env: dict[str, str],
        origin: HTTPRequest | None = None,
    ) -> HTTPResponse:
        spec = eval_spec(code, user, env)
        # Eval's code is the caller's own, whatever it says about it.
        result = await self.invoke(
            spec, Call(0, args), source="eval", expect=ValResult, by_owner=True, origin=origin
        )
        return result_response(result)


def _masked(error: HTTPError, spec: ValSpec) -> HTTPError:
    """The val's own error with env values taken out; valrun's own errors hold none."""
    if not isinstance(error, WorkerError):
        return error
    message = mask_secrets(error.message, spec.env)
    details = {
        key: [mask_secrets(line, spec.env) for line in value]
        if isinstance(value, list) and all(isinstance(line, str) for line in value)
        else value
        for key, value in error.details.items()
    }
    if message == error.message and details == error.details:
        return error
    masked = WorkerError(message, error.type, headers=error.headers, details=details)
    masked.log, masked.during_load = error.log, error.during_load
    return masked


def shown_to_others(error: HTTPError, spec: ValSpec) -> HTTPError:
    """The error as anyone but the val's owner sees it. A failed load's message may quote the
    source (a compiler's message quotes the offending line; a private val's source is
    private): others learn only that it failed, and where its owner reads why."""
    if not (isinstance(error, WorkerError) and error.during_load):
        return error
    shown = WorkerError(
        f"the val {spec.owner}/{spec.name} (version {spec.version}) failed to load; its owner "
        "can read why in the val's invocation records",
        error.type,
        headers=error.headers,
    )
    shown.during_load = True
    return shown
