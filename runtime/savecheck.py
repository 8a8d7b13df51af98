"""Checks at save: `PUT /v1/vals/...` refuses code that could not load, with the line and what
to change, instead of saving a version whose every visitor gets a 502.

The front end never parses the code: a nesting bomb would exhaust its stack, a size bomb its
memory. A fresh confined worker (the pool's, in the `check` mode) compiles it under the policy
the worker uses and exits (sandbox/check.py says what is checked); its answer is hostile input
like any worker's, and checked here. A check that kills its worker, runs out of memory or time
is the code's fault: 400 too, saying so.

Each check takes a worker from the pool's ready ones: at most `MAX_CHECKS_PER_USER` run at once
for one user and `pool.max_workers` in all; beyond that, 503 with `Retry-After`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from runtime.config import Config
from runtime.errors import BadRequestError, OverloadedError, WorkerError, WorkerTimeoutError
from runtime.pool import Pool
from runtime.reply import clean_text, protocol_error
from runtime.store import AsyncStore, Store
from sandbox.messages import Checked, MessageError, parse
from sandbox.wire import Frame

MAX_CHECKS_PER_USER = 2
# Failures of the check's worker that the code itself can cause (sandbox.errors.describe and
# WorkerProcess._died name them); anything else (a protocol error) stays a 502.
_CODE_FAULTS = frozenset({"memory_limit", "cpu_limit", "worker_crashed"})


def problems_from(frame: Frame) -> list[dict[str, object]]:
    """The problems a check worker reported, validated. Pure."""
    try:
        checked = parse(frame, Checked)
    except MessageError as exc:
        raise protocol_error(f"expected 'checked' with a list of problems: {exc}") from None
    return [{"line": p.line, "message": clean_text(p.message)} for p in checked.problems]


def refusal(problems: list[dict[str, object]]) -> BadRequestError:
    """400 `bad_code`: the first problem in the message, all of them in `problems`."""
    first = problems[0]
    where = f"line {first['line']}: " if first["line"] is not None else ""
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return BadRequestError(
        f"the code was not saved: {where}{first['message']}{more}",
        "bad_code",
        details={"line": first["line"], "problems": problems},
    )


class SaveChecks:
    def __init__(self, config: Config, pool: Pool, store: AsyncStore) -> None:
        self.pool = pool
        self.store = store
        self._running: Counter[str] = Counter()
        self._slots = trio.Semaphore(config.pool.max_workers)

    async def check(self, owner: str, name: str, code: str) -> None:
        """Raise 400 `bad_code` if the code could not load as the val `name`."""
        # Names are case-insensitive and a val keeps the spelling it was created with: that
        # is the name it must export (`PUT .../MYVAL` saves a new version of `myVal`).
        existing = await self.store.call(Store.get_val, owner, name, None)
        export = existing.name if existing is not None else name
        with self._slot(owner):
            try:
                frame = await self.pool.check_once(owner, export, code)
            except WorkerTimeoutError as exc:
                raise _code_fault(exc.message) from None
            except WorkerError as exc:
                if exc.type not in _CODE_FAULTS:
                    raise
                raise _code_fault(f"{exc.message} ({exc.type})") from None
        problems = problems_from(frame)
        if problems:
            raise refusal(problems)

    @contextmanager
    def _slot(self, owner: str) -> Iterator[None]:
        if self._running[owner] >= MAX_CHECKS_PER_USER:
            raise OverloadedError(
                f"{owner} is saving {MAX_CHECKS_PER_USER} vals already; retry shortly",
                headers=(("retry-after", "1"),),
            )
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            raise OverloadedError(
                "too many vals are being saved at once; retry shortly",
                headers=(("retry-after", "1"),),
            ) from None
        self._running[owner] += 1
        try:
            yield
        finally:
            self._running[owner] -= 1
            if not self._running[owner]:
                del self._running[owner]
            self._slots.release()


def _code_fault(what: str) -> BadRequestError:
    return BadRequestError(
        f"the code was not saved: compiling it went past the sandbox's limits: {what}; "
        "split very long expressions and deep nesting into smaller steps",
        "bad_code",
        details={"line": None, "problems": [{"line": None, "message": what}]},
    )
