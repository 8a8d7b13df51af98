"""The worker pool: one warm worker per active val version, reused across requests.

A worker is specialized once, for one version of one val, and dies with it (SPEC §8). Each
val version has a slot: a lock that serializes its requests, a bounded wait behind it, and at
most one worker. A worker that timed out, crashed, broke the protocol or ran out of memory is
killed and never reused; the next request starts a fresh one.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from runtime.config import Config
from runtime.errors import OverloadedError, WorkerTimeoutError
from runtime.process import WorkerProcess
from runtime.reply import Reply, check_failure, check_reply, protocol_error
from sandbox.wire import Frame

logger = logging.getLogger(__name__)


SlotKey = tuple[int, int, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class ValSpec:
    """Everything a worker needs to become one val version."""

    val_id: int
    version: int
    owner: str
    name: str
    code: str
    env: tuple[tuple[str, str], ...]
    host: str
    #: "module": run the module once, then serve requests; "eval": statements and a final
    #: expression whose value is the export (the Eval API).
    mode: str = "module"

    @property
    def key(self) -> SlotKey:
        # The env is part of the key: a changed env means a fresh worker on the next request.
        return (self.val_id, self.version, self.env)


class _Slot:
    def __init__(self, owner: str = "") -> None:
        self.owner = owner
        self.lock = trio.Lock()
        self.worker: WorkerProcess | None = None
        self.last_used = trio.current_time()
        # Set when the val is deleted or replaced: the in-flight request finishes, then the
        # worker goes.
        self.retired = False


class Pool:
    def __init__(self, config: Config, nursery: trio.Nursery, workdir: Path) -> None:
        self.config = config
        self.limits = config.limits
        self.nursery = nursery
        self.workdir = workdir
        self._slots: dict[SlotKey, _Slot] = {}
        self._request_ids = itertools.count(1)

    @property
    def worker_count(self) -> int:
        return sum(1 for slot in self._slots.values() if slot.worker is not None)

    async def invoke(self, spec: ValSpec, head: dict[str, object], body: bytes) -> Reply:
        slot = self._slots.get(spec.key)
        if slot is None:
            slot = self._slots[spec.key] = _Slot(spec.owner)
        waiting = slot.lock.statistics().tasks_waiting
        if slot.lock.locked() and waiting >= self.config.pool.max_queue_per_val:
            raise OverloadedError(
                f"{spec.owner}/{spec.name} has {waiting} requests waiting; retry shortly",
                headers=(("retry-after", "1"),),
            )
        async with slot.lock:
            try:
                if slot.worker is None or not slot.worker.alive:
                    slot.worker = None
                    slot.worker = await self._start(spec)
                return await self._exchange(slot, slot.worker, spec, head, body)
            finally:
                slot.last_used = trio.current_time()
                if slot.retired and slot.worker is not None:
                    self._close(slot)

    async def invoke_once(self, spec: ValSpec, head: dict[str, object], body: bytes) -> Reply:
        """Run one request in a fresh worker that serves nothing else (the Eval API)."""
        slot = _Slot(spec.owner)
        async with slot.lock:
            slot.worker = await self._start(spec)
            try:
                return await self._exchange(slot, slot.worker, spec, head, body)
            finally:
                self._close(slot)

    def retire(self, val_id: int) -> None:
        """Retire every worker of a val (deleted, or a new version saved)."""
        self._retire_where(lambda key, spec_owner: key[0] == val_id)

    def retire_owner(self, owner: str) -> None:
        """Retire every worker of an owner's vals (their env changed)."""
        self._retire_where(lambda key, spec_owner: spec_owner == owner)

    def _retire_where(self, doomed: Callable[[SlotKey, str], bool]) -> None:
        for key in [key for key, slot in self._slots.items() if doomed(key, slot.owner)]:
            slot = self._slots.pop(key)
            slot.retired = True
            if not slot.lock.locked() and slot.worker is not None:
                self._close(slot)

    async def _start(self, spec: ValSpec) -> WorkerProcess:
        self._evict_lru()
        worker = await WorkerProcess.spawn(
            cwd=self.workdir,
            max_body_bytes=self.limits.max_response_body_bytes,
            inherit_stderr=self.config.pool.inherit_worker_stderr,
        )
        limits = {
            "memory_mb": self.limits.memory_mb,
            "cpu_time_s": self.limits.cpu_time_s,
            "worker_cpu_time_s": self.limits.worker_cpu_time_s,
            "max_log_bytes": self.limits.max_log_bytes,
            "max_response_body_bytes": self.limits.max_response_body_bytes,
        }
        load = Frame(
            {
                "op": "load",
                "name": spec.name,
                "mode": spec.mode,
                "env": dict(spec.env),
                "limits": limits,
            },
            spec.code.encode(),
        )
        done = False
        try:
            with trio.move_on_after(self.config.pool.load_timeout_s):
                await worker.send(load)
                frame = await worker.receive()
                if frame.op == "error":
                    raise check_failure(frame.head)
                if frame.op != "loaded":
                    raise protocol_error(f"expected 'loaded', got {frame.op!r}")
                done = True
                return worker
            raise WorkerTimeoutError(
                f"{spec.owner}/{spec.name} took over {self.config.pool.load_timeout_s} s to load"
            )
        finally:
            if not done:
                self._kill(worker)

    async def _exchange(
        self,
        slot: _Slot,
        worker: WorkerProcess,
        spec: ValSpec,
        head: dict[str, object],
        body: bytes,
    ) -> Reply:
        request_id = next(self._request_ids)
        clean = False
        try:
            with trio.move_on_after(self.limits.wall_time_s):
                await worker.send(Frame({**head, "id": request_id}, body))
                frame = await worker.receive()
                reply = check_reply(frame, request_id, self.limits, spec.host)
                clean = not reply.retire
                return reply
            raise WorkerTimeoutError(
                f"{spec.owner}/{spec.name} ran longer than the {self.limits.wall_time_s} s "
                "wall-time limit and was stopped"
            )
        finally:
            # Whatever went wrong (timeout, garbage, a cancelled client), the worker's state
            # is unknown: it is never handed another request.
            if not clean:
                self._kill(worker)
                slot.worker = None

    def _kill(self, worker: WorkerProcess) -> None:
        worker.kill()
        self.nursery.start_soon(worker.aclose)

    def _close(self, slot: _Slot) -> None:
        worker, slot.worker = slot.worker, None
        if worker is not None:
            self.nursery.start_soon(worker.aclose)

    def _evict_lru(self) -> None:
        idle = [s for s in self._slots.values() if s.worker is not None and not s.lock.locked()]
        excess = self.worker_count - self.config.pool.max_workers + 1
        for slot in sorted(idle, key=lambda s: s.last_used)[: max(excess, 0)]:
            self._close(slot)

    async def serve_idle_expiry(self, *, task_status: trio.TaskStatus[None]) -> None:
        timeout = self.config.pool.idle_timeout_s
        task_status.started()
        while True:
            await trio.sleep(max(timeout / 4, 0.05))
            now = trio.current_time()
            for key, slot in list(self._slots.items()):
                if not slot.lock.locked() and now - slot.last_used >= timeout:
                    del self._slots[key]
                    self._close(slot)

    async def aclose(self) -> None:
        slots, self._slots = list(self._slots.values()), {}
        async with trio.open_nursery() as nursery:
            for slot in slots:
                if slot.worker is not None:
                    nursery.start_soon(slot.worker.aclose)
                    slot.worker = None


@asynccontextmanager
async def open_pool(config: Config) -> AsyncIterator[Pool]:
    workdir = Path(tempfile.mkdtemp(prefix="valrun-workers-"))
    try:
        async with trio.open_nursery() as nursery:
            pool = Pool(config, nursery, workdir)
            await nursery.start(pool.serve_idle_expiry)
            try:
                yield pool
            finally:
                with trio.CancelScope(shield=True):
                    await pool.aclose()
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
