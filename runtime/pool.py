"""The worker pool: prewarmed generic workers, and per-val pools of warm specialized ones.

A worker is specialized once, for one version of one val with one env, and dies with it
(docs/contract.md §11.1). Generic workers wait ready (forked, confined, with nothing of any
val in them);
specializing one is sending it a `load` frame. Per val version:

    requests --(bounded queue: 503 beyond it)--> up to `max_workers_per_val` workers
                                                 each serving one request at a time

Across vals, at most `max_workers` specialized workers live; the least recently used idle
one makes room. A worker that timed out, crashed, broke the protocol, ran out of memory, or
served `max_requests_per_worker` requests is retired and never reused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from runtime.config import Config
from runtime.errors import HTTPError, OverloadedError, WorkerTimeoutError
from runtime.isolation import check_required, health, log_table, probe_layers
from runtime.process import (
    ForkServerError,
    ForkServerHandle,
    SpawnedWorker,
    SupervisedForkServer,
    WorkerProcess,
    become_subreaper,
)
from runtime.reply import Reply, bounded_log, check_failure, check_reply, protocol_error
from runtime.supply import WorkerSupply
from runtime.tenants import TenantForkServers
from runtime.workdir import claim_workdir
from sandbox.messages import ASKS, Ask, Failure, Invocation, Load, Loaded, MessageError, Mode, parse
from sandbox.wire import Frame

logger = logging.getLogger(__name__)

SlotKey = tuple[int, int, tuple[tuple[str, str], ...]]
#: How often (in requests) a warm worker's memory is looked at.
RSS_CHECK_EVERY = 32
#: Replies with bodies larger than this are checked in a thread.
THREAD_CHECK_BYTES = 256 * 1024
WorkerFactory = Callable[[], Awaitable[WorkerProcess]]
#: Does what a val asked for while it runs (fetch, storage): the answer's frame to send back.
Broker = Callable[["ValSpec", Ask], Awaitable[Frame]]
ASK_OPS = frozenset(kind.op for kind in ASKS)


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
    mode: Mode = "module"

    @property
    def key(self) -> SlotKey:
        # The env is part of the key: a changed env means a fresh worker on the next request.
        return (self.val_id, self.version, self.env)


@dataclass(eq=False)
class _Warm:
    worker: WorkerProcess
    val_pool: _ValPool
    last_used: float
    requests: int = 0
    #: What the module printed while it loaded: it belongs to the first request's log.
    load_log: str = ""


class _ValPool:
    """The warm workers of one val version, and the requests waiting for them."""

    def __init__(self, spec: ValSpec, max_workers: int) -> None:
        self.spec = spec
        self.capacity = trio.Semaphore(max_workers)
        self.idle: list[_Warm] = []  # most recently used last
        self.retired = False


class Pool:
    def __init__(
        self,
        config: Config,
        nursery: trio.Nursery,
        factory: WorkerFactory,
        broker: Broker | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.limits = config.limits
        self.nursery = nursery
        self.factory = factory
        self.supply = WorkerSupply(
            factory, timeout_s=config.pool.load_timeout_s, on_failure=self._wake_prewarm
        )
        self._vals: dict[SlotKey, _ValPool] = {}
        self._warm_count = 0
        # Woken whenever a warm worker becomes idle or goes away. A parking lot, not an
        # event each waiter replaces: every waiter is woken, none can be left asleep.
        self._room = trio.lowlevel.ParkingLot()
        self._ready: list[WorkerProcess] = []
        self._want_ready = trio.Event()
        self._request_ids = itertools.count(1)
        self.stats: Counter[str] = Counter()
        self.fork_server: SupervisedForkServer | None = None
        #: One fork server per user (`sandbox.fork_server_per_user`), instead of `factory`.
        self.tenants: TenantForkServers | None = None
        #: The /healthz view of the confinement layers in force.
        self.isolation: dict[str, dict[str, object]] = {}

    def idle_workers(self) -> list[WorkerProcess]:
        """Warm workers waiting for their val's next request."""
        return [warm.worker for pool in self._vals.values() for warm in pool.idle]

    def gauges(self) -> dict[str, int]:
        """Workers by state and queued requests, for /metrics and /healthz."""
        pools = self._vals.values()
        idle = sum(len(pool.idle) for pool in pools)
        spares = self.tenants.spares if self.tenants is not None else 0
        return {
            "ready": len(self._ready) + spares,
            "idle": idle,
            "busy": self._warm_count - idle,
            "queued": sum(pool.capacity.statistics().tasks_waiting for pool in pools),
        }

    async def invoke(self, spec: ValSpec, request: Invocation) -> Reply:
        pool = self._vals.get(spec.key)
        if pool is None:
            pool = self._vals[spec.key] = _ValPool(spec, self.config.pool.max_workers_per_val)
        waiting = pool.capacity.statistics().tasks_waiting
        if pool.capacity.value == 0 and waiting >= self.config.pool.max_queue_per_val:
            self.stats["rejected_queue_full"] += 1
            raise OverloadedError(
                f"{spec.owner}/{spec.name} has {waiting} requests waiting; retry shortly",
                headers=(("retry-after", "1"),),
            )
        async with pool.capacity:
            warm = self._idle_worker(pool) or await self._specialize(pool)
            self.stats["invocations"] += 1
            reply, failure = None, "cancelled"
            try:
                reply = await self._exchange(warm.worker, spec, request)
                if warm.load_log:
                    reply = dataclasses.replace(reply, log=warm.load_log + reply.log)
                    warm.load_log = ""
                return reply
            except HTTPError as exc:
                failure = exc.type
                raise
            finally:
                self._release(warm, reply, failure)

    async def invoke_once(self, spec: ValSpec, request: Invocation) -> Reply:
        """Run one request in a fresh worker that serves nothing else (the Eval API)."""
        worker = await self._generic_worker(spec.owner)
        try:
            load_log = await self._load(worker, spec)
            reply = await self._exchange(worker, spec, request)
            return dataclasses.replace(reply, log=load_log + reply.log)
        finally:
            self._close(worker)
            self._want_ready.set()

    async def check_once(self, owner: str, name: str, code: str) -> Frame:
        """Compile a val's code in a fresh worker used once (checks at save); its raw reply,
        unchecked (runtime.savecheck checks it)."""
        worker = await self._generic_worker(owner)
        try:
            with trio.move_on_after(self.config.pool.load_timeout_s):
                await worker.send(Load(name, code, "check", (), self.limits).to_frame())
                return await worker.receive()
            raise WorkerTimeoutError(
                f"compiling the code took over {self.config.pool.load_timeout_s} s"
            )
        finally:
            self._close(worker)
            self._want_ready.set()

    def retire(self, val_id: int) -> None:
        """Retire every worker of a val (deleted, or a new version saved)."""
        self._retire_where(lambda pool: pool.spec.val_id == val_id)

    def retire_user(self, user: str) -> None:
        """Retire every worker of a user's vals (their env changed)."""
        self._retire_where(lambda pool: pool.spec.owner == user)

    def retire_all(self) -> None:
        """Retire every worker (the change feed was lost: anything may have changed)."""
        self._retire_where(lambda pool: True)

    def _retire_where(self, doomed: Callable[[_ValPool], bool]) -> None:
        for key in [key for key, pool in self._vals.items() if doomed(pool)]:
            pool = self._vals.pop(key)
            pool.retired = True  # busy workers go when their request is done
            for warm in pool.idle:
                self._drop(warm)
            pool.idle.clear()

    # Workers: generic (prewarmed) -> specialized (warm, in a _ValPool) -> closed.

    async def _generic_worker(self, owner: str) -> WorkerProcess:
        if self.tenants is not None:  # from the user's own fork server, with its own spares
            try:
                return await self.tenants.spawn(owner)
            except (ForkServerError, OSError) as exc:  # the process limit, descriptors, ...
                raise OverloadedError(
                    f"no worker can be started right now ({exc}); retry shortly",
                    headers=(("retry-after", "1"),),
                ) from None
        # The refill (a fork plus ~2 ms of confinement) is asked for after this request, in
        # `_release`: started now, it would compete with this request for the CPU.
        while self._ready:
            worker = self._ready.pop(0)
            if worker.still_running():
                self.stats["prewarmed_used"] += 1
                return worker
            self._close(worker)  # died ready (with its fork server, say): free its socket
        self.stats["forked_on_demand"] += 1
        return await self.supply.get()

    def _idle_worker(self, pool: _ValPool) -> _Warm | None:
        """The most recently used idle worker still running (one may have died idle)."""
        while pool.idle:
            warm = pool.idle.pop()
            if warm.worker.still_running():
                return warm
            self.stats["died_idle"] += 1
            self._drop(warm)
        return None

    async def _specialize(self, pool: _ValPool) -> _Warm:
        await self._make_room()
        self._warm_count += 1
        try:
            worker = await self._generic_worker(pool.spec.owner)
            try:
                load_log = await self._load(worker, pool.spec)
            except BaseException:
                self._close(worker)
                raise
        except BaseException:
            self._warm_count -= 1
            self._room.unpark_all()
            raise
        self.stats["cold_starts"] += 1
        return _Warm(worker, pool, trio.current_time(), load_log=load_log)

    async def _make_room(self) -> None:
        """Wait until one more warm worker fits under `max_workers`, evicting LRU idle ones."""
        with trio.move_on_after(self.config.pool.load_timeout_s):
            while self._warm_count >= self.config.pool.max_workers:
                idle = [w for pool in self._vals.values() for w in pool.idle]
                if idle:
                    oldest = min(idle, key=lambda w: w.last_used)
                    oldest.val_pool.idle.remove(oldest)
                    self.stats["evicted_lru"] += 1
                    self._drop(oldest)
                    continue
                await self._room.park()
            return
        raise OverloadedError(
            f"all {self.config.pool.max_workers} workers are busy; retry shortly",
            headers=(("retry-after", "1"),),
        )

    async def _load(self, worker: WorkerProcess, spec: ValSpec) -> str:
        """Specialize a generic worker; what the module printed while it ran."""
        load = Load(spec.name, spec.code, spec.mode, spec.env, self.limits)
        with trio.move_on_after(self.config.pool.load_timeout_s):
            await worker.send(load.to_frame())
            frame = await worker.receive()
            try:
                loaded = parse(frame, Loaded, Failure)
            except MessageError as exc:
                raise protocol_error(str(exc)) from None
            log = bounded_log(loaded.log, self.limits)
            if isinstance(loaded, Failure):
                failure = check_failure(loaded)
                failure.log = log
                failure.during_load = True
                raise failure
            return log
        raise WorkerTimeoutError(
            f"{spec.owner}/{spec.name} took over {self.config.pool.load_timeout_s} s to load"
        )

    async def _exchange(self, worker: WorkerProcess, spec: ValSpec, request: Invocation) -> Reply:
        request = dataclasses.replace(request, id=next(self._request_ids))
        frame: Frame | None = None
        with trio.move_on_after(self.limits.wall_time_s):
            await worker.send(request.to_frame())
            frame = await self._receive_reply(worker, spec, request.id)
        if frame is not None:  # not timed out
            kind = type(request)
            if len(frame.body) <= THREAD_CHECK_BYTES:
                return check_reply(frame, request.id, kind, self.limits, spec.host)
            # Parsing a 5 MiB JSON result takes ~70 ms: not on the event loop.
            return await trio.to_thread.run_sync(
                check_reply, frame, request.id, kind, self.limits, spec.host
            )
        raise WorkerTimeoutError(
            f"{spec.owner}/{spec.name} ran longer than the {self.limits.wall_time_s} s "
            "wall-time limit and was stopped"
        )

    async def _receive_reply(self, worker: WorkerProcess, spec: ValSpec, request_id: int) -> Frame:
        """The reply to request `request_id`, answering what the val asks for on the way.

        A request still running after `demote_after_s` runs at idle CPU priority until it
        answers. Only the wait for the worker's bytes is timed for that (a partly read frame
        stays in the decoder), never an ask being answered.
        """
        demote_at: float | None = trio.current_time() + self.config.pool.demote_after_s
        demoted = False
        try:
            while True:
                frame = None
                if demote_at is None:
                    frame = await worker.receive()
                else:
                    with trio.move_on_at(demote_at):
                        frame = await worker.receive()
                if frame is None:  # still running: let it have only the CPU nobody wants
                    demote_at = None
                    demoted = worker.demote()
                    self.stats["demoted"] += demoted
                    continue
                if frame.op not in ASK_OPS:
                    return frame
                try:
                    ask = parse(frame, *ASKS)
                except MessageError as exc:
                    raise protocol_error(str(exc)) from None
                if ask.id != request_id or self.broker is None:
                    raise protocol_error(f"an unexpected {frame.op!r} ask")
                await worker.send(await self.broker(spec, ask))
        finally:
            if demoted:
                worker.promote()

    def _release(self, warm: _Warm, reply: Reply | None, failure: str) -> None:
        """After a request: back to idle, or gone if anything about it was off."""
        if len(self._ready) < self.config.pool.prewarm_workers:
            self._want_ready.set()
        warm.requests += 1
        warm.last_used = trio.current_time()
        if reply is None:
            # Whatever went wrong (timeout, garbage, a cancelled client), the worker's state
            # is unknown: it is never handed another request.
            self.stats[f"killed_{failure}"] += 1
            warm.worker.kill()
        elif reply.retire:
            outcome = reply.outcome
            self.stats[
                f"killed_{outcome.type if isinstance(outcome, HTTPError) else 'retired'}"
            ] += 1
        if (
            reply is None
            or reply.retire  # it said it is done (out of memory, CPU budget spent)
            or warm.val_pool.retired
            or warm.requests >= self.config.pool.max_requests_per_worker
            or self._grown(warm)
        ):
            self._drop(warm)
        else:
            warm.val_pool.idle.append(warm)
            self._room.unpark_all()

    def _grown(self, warm: _Warm) -> bool:
        """True when a worker's memory has grown past the limit (module state that leaks)."""
        if warm.requests % RSS_CHECK_EVERY:
            return False
        rss = warm.worker.rss_bytes()
        if rss is None or rss <= self.config.pool.max_worker_rss_mb * 1024 * 1024:
            return False
        self.stats["killed_memory_growth"] += 1
        return True

    def _drop(self, warm: _Warm) -> None:
        self._warm_count -= 1
        self._room.unpark_all()
        self._close(warm.worker)

    def _close(self, worker: WorkerProcess) -> None:
        self.nursery.start_soon(worker.aclose)

    # Background tasks

    async def serve_prewarm(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep `prewarm_workers` generic workers ready."""
        task_status.started()
        while True:
            # While the supply fails, this task is what retries it, even with every ready
            # worker in place (a request found none to spare): until it works again, requests
            # that need a new worker get 503 and /healthz says degraded.
            while len(self._ready) < self.config.pool.prewarm_workers or self.supply.failing:
                try:
                    self._ready.append(await self.supply.get())
                except OverloadedError:  # logged by the supply, once per outage
                    await self.supply.wait_to_retry()
            self._want_ready = trio.Event()
            await self._want_ready.wait()

    def _wake_prewarm(self) -> None:
        self._want_ready.set()

    async def serve_idle_expiry(self, *, task_status: trio.TaskStatus[None]) -> None:
        timeout = self.config.pool.idle_timeout_s
        task_status.started()
        while True:
            await trio.sleep(max(timeout / 4, 0.05))
            now = trio.current_time()
            for key, pool in list(self._vals.items()):
                for warm in [w for w in pool.idle if now - w.last_used >= timeout]:
                    pool.idle.remove(warm)
                    self._drop(warm)
                if not pool.idle and pool.capacity.value == self.config.pool.max_workers_per_val:
                    del self._vals[key]

    async def aclose(self) -> None:
        vals, self._vals = list(self._vals.values()), {}
        ready, self._ready = self._ready, []
        async with trio.open_nursery() as nursery:
            for worker in ready + [w.worker for pool in vals for w in pool.idle]:
                nursery.start_soon(worker.aclose)


async def _no_shared_workers() -> WorkerProcess:
    raise RuntimeError("workers come from each user's own fork server (runtime.tenants)")


@asynccontextmanager
async def open_pool(
    config: Config, *, worker_command: tuple[str, ...] | None = None
) -> AsyncIterator[Pool]:
    """The pool, with its fork server; `worker_command` spawns workers instead (for tests)."""
    isolation = await trio.to_thread.run_sync(probe_layers, config.sandbox.worker_uid)
    if worker_command is None:
        log_table(isolation)
        check_required(isolation, config.sandbox)
    plan: dict[str, object] = {
        "memory_mb": config.limits.memory_mb,
        # The hard CPU limit: the worker lowers its soft limit per invocation, never past this.
        "cpu_time_s": config.limits.worker_cpu_time_s,
        "open_files": 64,
        "drop_to_uid": config.sandbox.worker_uid,
        # Everything available is applied, required or not.
        "layers": sorted(layer for layer, status in isolation.items() if status.active),
    }
    claimed = await trio.to_thread.run_sync(claim_workdir)
    workdir = claimed.path
    inherit = config.pool.inherit_worker_stderr
    max_body = config.limits.max_response_body_bytes
    try:
        # `nursery` holds what must outlive the requests: the fork server's control reader
        # and the workers' closing; `background` holds what stops first.
        async with trio.open_nursery() as nursery:
            fork_server: SupervisedForkServer | None = None
            tenants: TenantForkServers | None = None
            factory: WorkerFactory
            start_fork_server = functools.partial(
                ForkServerHandle.start,
                nursery,
                workdir=workdir,
                plan=plan,
                max_body_bytes=max_body,
                inherit_stderr=inherit,
            )
            if worker_command is None:
                become_subreaper()
            if worker_command is None and config.sandbox.fork_server_per_user:
                tenants = TenantForkServers(
                    start_fork_server,
                    nursery,
                    max_spares=config.pool.prewarm_workers,
                    max_idle_servers=config.sandbox.max_idle_fork_servers,
                )
                factory = _no_shared_workers
            elif worker_command is None:
                fork_server = SupervisedForkServer(
                    start_fork_server,
                    # Two tries fit in the supply's timeout, so a wedged fork server is
                    # replaced, not merely given up on.
                    spawn_timeout_s=config.pool.load_timeout_s / 3,
                )
                await fork_server.start()
                factory = fork_server.spawn
            else:

                async def factory() -> WorkerProcess:
                    return await SpawnedWorker.spawn(
                        nursery,
                        cwd=workdir,
                        max_body_bytes=max_body,
                        command=worker_command,
                        inherit_stderr=inherit,
                    )

            pool = Pool(config, nursery, factory)
            pool.fork_server = fork_server
            pool.tenants = tenants
            pool.isolation = health(isolation) if worker_command is None else {}
            try:
                async with trio.open_nursery() as background:
                    if fork_server is not None:
                        await background.start(fork_server.serve_restarts)
                    if tenants is None:  # per user, spares are kept by `tenants`
                        await background.start(pool.serve_prewarm)
                    await background.start(pool.serve_idle_expiry)
                    try:
                        yield pool
                    finally:
                        background.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await pool.aclose()
                    if fork_server is not None:
                        await fork_server.aclose()
                    if tenants is not None:
                        await tenants.aclose()
                nursery.cancel_scope.cancel()
    finally:
        claimed.remove()
