"""The worker pool: prewarmed generic workers, and per-val pools of warm specialized ones.

A worker is specialized once, for one version of one val with one env, and dies with it
(docs/contract.md §11.1). Generic workers wait ready (forked, confined, with nothing of any
val in them);
specializing one is sending it a `load` frame. Per val version:

    requests --(bounded queue: 503 beyond it)--> up to `max_workers_per_val` workers
                                                 each running one request at a time, with
                                                 up to `pipeline_window` sent to it
                                                 (runtime/pipeline.py)

Across vals, at most `max_workers` specialized workers live, shared fairly between users
(runtime.shares: a cap per user, a bounded wait per user, round-robin for a full pool, and
eviction from the user most over their share). A worker that timed out, crashed, broke the
protocol, ran out of memory, or served `max_requests_per_worker` requests is retired and never
reused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import trio

from runtime.config import Config
from runtime.errors import HTTPError, OverloadedError, WorkerError, WorkerTimeoutError
from runtime.isolation import check_required, health, log_table, probe_layers
from runtime.pipeline import Lane, NotStartedError, Turn
from runtime.process import (
    ForkServerHandle,
    SpawnedWorker,
    SupervisedForkServer,
    WorkerProcess,
    become_subreaper,
)
from runtime.quotas import check_load_fits
from runtime.reply import Reply, bounded_log, check_failure, check_reply, protocol_error
from runtime.shares import Shares
from runtime.supply import WorkerSupply
from runtime.tenants import TenantForkServers
from runtime.workdir import claim_workdir
from sandbox.messages import (
    ASKS,
    LOAD_ASK_ID,
    Ask,
    Failure,
    HttpRequest,
    ImportAsk,
    Invocation,
    Load,
    Loaded,
    MessageError,
    Mode,
    parse,
)
from sandbox.wire import Frame

logger = logging.getLogger(__name__)

SlotKey = tuple[int, int, tuple[tuple[str, str], ...]]
#: How often the memory of all workers together is looked at (`max_total_worker_mib`).
MEMORY_SWEEP_S = 0.25
MIB = 1024 * 1024
#: Replies with bodies larger than this are checked in a thread.
THREAD_CHECK_BYTES = 256 * 1024
#: Only requests with bodies this small are pipelined: their frame fits in the socket's
#: buffer, so sending it never waits for a worker busy with the request before it.
PIPELINE_MAX_BODY_BYTES = 64 * 1024
#: A busy worker takes pipelined requests until it has had this many windows' worth since it
#: was last idle; then it drains, and goes to whoever waits for a worker.
LANE_RUN = 4
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
    #: Its requests in flight (runtime.pipeline): one, or more when pipelined.
    lane: Lane = field(default_factory=Lane)


class _ValPool:
    """The warm workers of one val version, and the requests waiting for them."""

    def __init__(self, spec: ValSpec, max_workers: int, window: int = 1) -> None:
        self.spec = spec
        #: Requests in flight on this val's workers: each worker's window. Waiting for a
        #: token is the per-val queue, first come first served.
        self.tokens = max_workers * window
        self.capacity = trio.Semaphore(self.tokens)
        self.max_workers = max_workers
        self.workers = 0  # warm ones, and those being specialized
        self.idle: list[_Warm] = []  # most recently used last
        self.busy: set[_Warm] = set()
        #: Woken when a request on one of its workers is done, or a worker goes: a request
        #: holding a token may find room now.
        self.freed = trio.lowlevel.ParkingLot()
        self.retired = False
        #: The vals its workers imported at their latest version (runtime.imports): a change
        #: to any of them retires this pool (`Pool.val_changed`).
        self.imports: set[int] = set()

    @property
    def queued(self) -> int:
        """Requests waiting for a worker: for a token, or holding one until one has room."""
        return self.capacity.statistics().tasks_waiting + self.freed.statistics().tasks_waiting


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
        pool = config.pool
        self.shares = Shares(
            max_workers=pool.max_workers,
            max_per_user=pool.max_workers_per_user,
            max_queued_per_user=pool.max_queued_per_user,
            cold_starts_per_s=pool.cold_starts_per_user_per_s,
        )
        #: Workers used once (Eval, checks at save), while they run; and workers loading
        #: their val to become warm ones.
        self._once: set[WorkerProcess] = set()
        self._loading: set[WorkerProcess] = set()
        #: Workers stopped for being the largest over `max_total_worker_mib`.
        self._overweight: set[WorkerProcess] = set()
        #: The resident memory of all workers at the last look.
        self.memory_bytes = 0
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
        #: Bumped by every `val_changed`: an import answered across a change re-checks.
        self.val_changes = 0

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
            "busy": self._warm_count - idle + len(self._once),  # Evals are busy workers too
            "queued": sum(pool.queued for pool in pools),
        }

    async def invoke(self, spec: ValSpec, request: Invocation) -> Reply:
        pool = self._vals.get(spec.key)
        if pool is None:
            config = self.config.pool
            pool = _ValPool(spec, config.max_workers_per_val, config.pipeline_window)
            self._vals[spec.key] = pool
        waiting = pool.queued
        if waiting >= self.config.pool.max_queue_per_val:
            self.stats["rejected_queue_full"] += 1
            raise OverloadedError(
                f"{spec.owner}/{spec.name} has {waiting} requests waiting; retry shortly",
                headers=(("retry-after", "1"),),
            )
        self.shares.enqueue(spec.owner)  # 429 when too many of the user's wait already
        waiting = True
        try:
            async with pool.capacity:
                alone = False
                while True:
                    warm = await self._worker_for(pool, request, alone=alone)
                    if waiting:
                        self.shares.dequeue(spec.owner)
                        waiting = False
                    try:
                        return await self._serve(warm, spec, request)
                    except NotStartedError:
                        # Its worker went before its turn: it runs alone on another, as it
                        # would have without pipelining (an idle worker's first request is
                        # its head).
                        self.stats["pipelined_sent_again"] += 1
                        self.stats["invocations"] -= 1  # counted once, when it is served
                        alone = True
        finally:
            if waiting:
                self.shares.dequeue(spec.owner)

    async def _worker_for(self, pool: _ValPool, request: Invocation, *, alone: bool) -> _Warm:
        """A worker for `request`: an idle one, else a new one while the val has fewer than
        `max_workers_per_val`, else a busy one that takes it behind its current requests
        (`_pipelined`, unless `alone`); else wait until a request or a worker is done."""
        while True:
            warm = self._idle_worker(pool)
            if warm is None and pool.workers < pool.max_workers:
                pool.workers += 1
                try:
                    warm = await self._specialize(pool)
                except BaseException:
                    pool.workers -= 1
                    pool.freed.unpark_all()
                    raise
            if warm is not None:
                pool.busy.add(warm)
                return warm
            if not alone and (busy := self._pipelined(pool, request)) is not None:
                return busy
            await pool.freed.park()

    def _pipelined(self, pool: _ValPool, request: Invocation) -> _Warm | None:
        """A busy worker of this val that takes `request` behind its current ones, or None.

        Only a web request with a small body; only into a worker that has been fast lately
        and is not running a slow request now (runtime.pipeline.Lane.can_take), and whose
        lane has taken fewer than `LANE_RUN` windows' worth since the worker was last idle
        (so that it drains now and then, and is looked at: its memory, `_release`); the
        least loaded first.
        """
        config = self.config.pool
        if config.pipeline_window < 2 or not pool.busy:
            return None
        if not isinstance(request, HttpRequest) or len(request.body) > PIPELINE_MAX_BODY_BYTES:
            return None
        now = trio.current_time()
        fit = [
            warm
            for warm in pool.busy
            if warm.lane.can_take(now, config.pipeline_window, config.pipeline_below_s)
            and warm.requests + warm.lane.served + len(warm.lane.turns)
            < config.max_requests_per_worker
            and warm.lane.served + len(warm.lane.turns) < LANE_RUN * config.pipeline_window
        ]
        if not fit:
            return None
        self.stats["pipelined"] += 1
        return min(fit, key=lambda warm: len(warm.lane.turns))

    async def _serve(self, warm: _Warm, spec: ValSpec, request: Invocation) -> Reply:
        """Send `request` to a warm worker now, and run it when its turn in the lane comes."""
        lane = warm.lane
        request = dataclasses.replace(request, id=next(self._request_ids))
        frame = request.to_frame()
        turn = lane.join()
        self.stats["invocations"] += 1
        reply, failure = None, "cancelled"
        try:
            await self._send_in_turn(warm, turn, frame)
            await lane.wait_turn(turn)
            reply = await self._exchange(warm.worker, spec, request, sent=True)
            if warm.load_log:
                reply = dataclasses.replace(reply, log=warm.load_log + reply.log)
                warm.load_log = ""
            return reply
        except NotStartedError:
            failure = "not_started"
            raise
        except HTTPError as exc:
            failure = exc.type
            raise
        finally:
            self._finish(warm, turn, reply, failure)

    async def _send_in_turn(self, warm: _Warm, turn: Turn, frame: Frame) -> None:
        """Send a request's frame whole, whatever happens to its task meanwhile: a frame cut
        short would garble the socket for the requests in flight with it."""
        lane = warm.lane
        if warm.worker.send_nowait(frame):
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.limits.wall_time_s) as sending:
                try:
                    await warm.worker.send(frame)
                except WorkerError:
                    if lane.is_head(turn):
                        raise  # its own error, as without pipelining
                    lane.close(None, "worker_crashed")
                    raise NotStartedError from None
        if sending.cancelled_caught:  # the worker does not read its socket
            head = lane.is_head(turn)
            lane.close(None, "timeout")
            if not head:
                raise NotStartedError
            raise WorkerTimeoutError(
                f"the worker did not take the request within {self.limits.wall_time_s} s"
            )

    def _finish(self, warm: _Warm, turn: Turn, reply: Reply | None, failure: str) -> None:
        """A request on `warm` is done; the last one in flight releases the worker."""
        lane = warm.lane
        warm.val_pool.freed.unpark_all()  # a place in its window, or the worker, is free
        if not lane.finish(turn, reply, failure):
            return  # others are in flight on it still
        pool = warm.val_pool
        pool.busy.discard(warm)
        if lane.ending is not None:
            reply, failure = lane.ending
        # `_release` counts one request; the lane counted those it served before this.
        warm.requests += max(lane.served - 1, 0)
        lane.served = 0
        self._release(warm, reply, failure)

    async def invoke_once(self, spec: ValSpec, request: Invocation) -> Reply:
        """Run one request in a fresh worker that serves nothing else (the Eval API)."""
        self._check_total_memory()
        worker = await self._generic_worker(spec.owner)
        self._once.add(worker)
        try:
            load_log = await self._load(worker, spec)
            reply = await self._exchange(worker, spec, request)
            return dataclasses.replace(reply, log=load_log + reply.log)
        finally:
            self._once.discard(worker)
            self._close(worker)
            self._want_ready.set()

    async def check_once(self, owner: str, name: str, code: str) -> Frame:
        """Compile a val's code in a fresh worker used once (checks at save); its raw reply,
        unchecked (runtime.savecheck checks it). Its imports of vals are answered as
        `owner`'s."""
        worker = await self._generic_worker(owner)
        spec = ValSpec(0, 0, owner, name, code, (), "", mode="check")
        self._once.add(worker)
        try:
            with trio.move_on_after(self.config.pool.load_timeout_s):
                await worker.send(Load(name, code, "check", (), self.limits, owner).to_frame())
                return await self._receive_loaded(worker, spec)
            raise WorkerTimeoutError(
                f"compiling the code took over {self.config.pool.load_timeout_s} s"
            )
        finally:
            self._once.discard(worker)
            self._close(worker)
            self._want_ready.set()

    def retire(self, val_id: int) -> None:
        """Retire every worker of a val (deleted, or a new version saved)."""
        self._retire_where(lambda pool: pool.spec.val_id == val_id)

    def val_changed(self, val_id: int) -> None:
        """A val got a new version, was deleted, or changed its privacy: its own workers and
        those of every val that imported it at its latest version retire, so that the next
        request loads the new code (or gets the import's error). The one reaction to a change
        of a val, whichever node made it."""
        self.val_changes += 1
        self.retire(val_id)
        self.retire_importers_of(val_id)

    def retire_importers_of(self, val_id: int) -> None:
        """Retire the workers of every val that imported val `val_id` at its latest version."""
        self._retire_where(lambda pool: val_id in pool.imports)

    def note_import(self, spec: ValSpec, val_id: int) -> None:
        """The workers of `spec` imported val `val_id` at its latest version."""
        pool = self._vals.get(spec.key)
        if pool is not None and not pool.retired:
            pool.imports.add(val_id)

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
        if self.tenants is not None:
            # From the user's own fork server, with its own spares and its own supply: one
            # user's broken fork server backs off on its own and stalls nobody else.
            return await self.tenants.spawn(owner)
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
        owner = pool.spec.owner
        self._check_total_memory()
        await self._cold_start_turn(owner)
        await self._make_room(owner)
        self._warm_count += 1
        self.shares.take(owner)
        try:
            worker = await self._generic_worker(pool.spec.owner)
            self._loading.add(worker)  # its module may allocate: the memory sweep sees it
            try:
                load_log = await self._load(worker, pool.spec)
            except BaseException:
                self._close(worker)
                raise
            finally:
                self._loading.discard(worker)
        except BaseException:
            self._warm_count -= 1
            self.shares.give_back(owner)
            self._room.unpark_all()
            raise
        self.stats["cold_starts"] += 1
        return _Warm(worker, pool, trio.current_time(), load_log=load_log)

    async def _cold_start_turn(self, owner: str) -> None:
        """Wait for `owner`'s turn to start a worker (their rate of cold starts)."""
        now = trio.current_time()
        wait = self.shares.cold_start_wait(owner, now, self.config.pool.load_timeout_s)
        if wait:
            self.stats["cold_starts_delayed"] += 1
            try:
                await trio.sleep(wait)
            except trio.Cancelled:
                self.shares.cold_start_refund(owner)
                raise

    async def _make_room(self, owner: str) -> None:
        """Wait until one more warm worker of `owner` fits, under their cap and under
        `max_workers`, evicting idle workers as runtime.shares decides; then return at once
        (no checkpoint), so the caller takes the room it was given."""
        shares = self.shares
        with (
            trio.move_on_after(self.config.pool.load_timeout_s),
            self._leaving_wakes(),
            shares.in_line(owner) as ticket,
        ):
            while True:
                if shares.at_cap(owner):  # a swap within the user's own share...
                    if shares.may_swap(owner) and self._evict(owner):
                        return  # ...unless one holding fewer waits: theirs, then
                elif shares.first_in_line(owner, ticket):
                    if self._warm_count < self.config.pool.max_workers:
                        return
                    victim = shares.evict_from(owner, self._oldest_idle())
                    if victim is not None and self._evict(victim):
                        continue
                elif (
                    self._warm_count >= self.config.pool.max_workers
                    and shares.may_swap(owner)
                    and self._evict(owner)
                ):
                    return  # not this user's turn, but a swap within their own share is
                await self._room.park()
        if shares.at_cap(owner):
            raise shares.over_cap(owner)
        raise OverloadedError(
            f"all {self.config.pool.max_workers} workers are busy; retry shortly",
            headers=(("retry-after", "1"),),
        )

    @contextmanager
    def _leaving_wakes(self) -> Iterator[None]:
        """Whoever leaves the line (served, timed out, cancelled) wakes the others: the
        first in line may be someone else now."""
        try:
            yield
        finally:
            if self.shares.waiting:
                self._room.unpark_all()

    def _oldest_idle(self) -> dict[str, float]:
        """User -> when their least recently used idle worker was last used."""
        oldest: dict[str, float] = {}
        for pool in self._vals.values():
            for warm in pool.idle:
                owner = pool.spec.owner
                oldest[owner] = min(oldest.get(owner, warm.last_used), warm.last_used)
        return oldest

    def _evict(self, owner: str) -> bool:
        """Stop `owner`'s least recently used idle worker; False if they have none."""
        idle = [w for pool in self._vals.values() if pool.spec.owner == owner for w in pool.idle]
        if not idle:
            return False
        oldest = min(idle, key=lambda w: w.last_used)
        oldest.val_pool.idle.remove(oldest)
        self.stats["evicted_lru"] += 1
        self._drop(oldest)
        return True

    async def _load(self, worker: WorkerProcess, spec: ValSpec) -> str:
        """Specialize a generic worker; what the module printed while it ran."""
        load = Load(spec.name, spec.code, spec.mode, spec.env, self.limits, spec.owner)
        check_load_fits(load)  # an env stored too large: a clear error, not a dead worker
        with trio.move_on_after(self.config.pool.load_timeout_s):
            await worker.send(load.to_frame())
            try:
                frame = await self._receive_loaded(worker, spec)
            except WorkerError:
                if worker in self._overweight:
                    raise self._stopped_for_memory() from None
                raise
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

    async def _receive_loaded(self, worker: WorkerProcess, spec: ValSpec) -> Frame:
        """The answer to a `load`, answering the imports of vals the module makes on the way
        (with `LOAD_ASK_ID`); any other ask while it loads is a protocol error."""
        while True:
            frame = await self._receive_demoted(worker)
            if frame.op != ImportAsk.op:
                return frame
            try:
                ask = parse(frame, ImportAsk)
            except MessageError as exc:
                raise protocol_error(str(exc)) from None
            if ask.id != LOAD_ASK_ID or self.broker is None:
                raise protocol_error(f"an unexpected {frame.op!r} ask while loading")
            await worker.send(await self.broker(spec, ask))

    async def _receive_demoted(self, worker: WorkerProcess) -> Frame:
        """The next frame; a module still loading after `demote_after_s` (spinning at module
        level, say) runs at idle CPU priority until it answers, as a long request does."""
        with trio.move_on_after(self.config.pool.demote_after_s):
            return await worker.receive()  # a partly read frame stays in the decoder
        demoted = worker.demote()
        self.stats["demoted_loading"] += demoted
        try:
            return await worker.receive()
        finally:
            if demoted:
                worker.promote()

    async def _exchange(
        self, worker: WorkerProcess, spec: ValSpec, request: Invocation, *, sent: bool = False
    ) -> Reply:
        """Send `request` (unless `sent` already, with its id) and check its reply."""
        if not sent:
            request = dataclasses.replace(request, id=next(self._request_ids))
        frame: Frame | None = None
        with trio.move_on_after(self.limits.wall_time_s):
            if not sent:
                await worker.send(request.to_frame())
            try:
                frame = await self._receive_reply(worker, spec, request.id)
            except WorkerError:
                if worker in self._overweight:
                    raise self._stopped_for_memory() from None
                raise
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
        """True when a worker's memory has grown past the limit (module state that leaks).
        Looked at after every request: reading /proc/PID/statm costs microseconds."""
        rss = warm.worker.rss_bytes()
        if rss is None or rss <= self.config.pool.max_worker_rss_mb * 1024 * 1024:
            return False
        self.stats["killed_memory_growth"] += 1
        return True

    # The memory of all workers together (`max_total_worker_mib`)

    def _workers(self) -> list[tuple[WorkerProcess, _Warm | None]]:
        """Every worker the pool holds, and its warm handle when it has one."""
        warm = [(w.worker, w) for pool in self._vals.values() for w in pool.idle]
        warm += [(w.worker, w) for pool in self._vals.values() for w in pool.busy]
        spares = self.tenants.spare_workers() if self.tenants is not None else []
        others = self._ready + list(self._once) + list(self._loading) + spares
        return warm + [(worker, None) for worker in others]

    def _measure(self) -> list[tuple[int, WorkerProcess, _Warm | None]]:
        sizes = [(worker.rss_bytes() or 0, worker, warm) for worker, warm in self._workers()]
        self.memory_bytes = sum(size for size, _worker, _warm in sizes)
        return sizes

    def _enforce_total_memory(self, *, kill_busy: bool = True) -> None:
        """Stop the largest workers until all together are under the ceiling. An idle one
        simply goes; a busy one is killed, and its request answered 502 `memory_limit`
        (unless `kill_busy` is False: then only idle ones go)."""
        ceiling = self.config.pool.max_total_worker_mib * MIB
        sizes = sorted(self._measure(), key=lambda entry: entry[0], reverse=True)
        total = self.memory_bytes
        for size, worker, warm in sizes:
            if total <= ceiling:
                break
            idle = warm is not None and warm in warm.val_pool.idle
            if warm is not None and idle:
                warm.val_pool.idle.remove(warm)
                self._drop(warm)
            elif kill_busy:
                self._overweight.add(worker)
                worker.kill()
            else:
                continue
            total -= size
            self.stats["killed_memory_total"] += 1
        self.memory_bytes = total

    def _check_total_memory(self) -> None:
        """Before a new worker: room under the ceiling, made from idle workers, or 503 (a
        busy worker is not killed for a new one; the sweep does that to the largest)."""
        ceiling = self.config.pool.max_total_worker_mib * MIB
        if self.memory_bytes <= ceiling:
            return
        self._enforce_total_memory(kill_busy=False)
        if self.memory_bytes > ceiling:
            raise OverloadedError(
                f"the workers together hold {self.memory_bytes // MIB} MiB, over "
                f"pool.max_total_worker_mib ({self.config.pool.max_total_worker_mib}); "
                "retry shortly",
                headers=(("retry-after", "1"),),
                details={"limit": "pool.max_total_worker_mib"},
            )

    def _stopped_for_memory(self) -> WorkerError:
        return WorkerError(
            "the worker was stopped: it was the largest when all workers together held more "
            f"than pool.max_total_worker_mib ({self.config.pool.max_total_worker_mib} MiB)",
            "memory_limit",
        )

    async def serve_memory_ceiling(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await trio.sleep(MEMORY_SWEEP_S)
            self._overweight = {w for w in self._overweight if w.still_running()}
            self._enforce_total_memory()

    def _drop(self, warm: _Warm) -> None:
        warm.val_pool.workers -= 1
        warm.val_pool.freed.unpark_all()
        self._warm_count -= 1
        self.shares.give_back(warm.val_pool.spec.owner)
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
                if not pool.idle and pool.capacity.value == pool.tokens:
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
                    timeout_s=config.pool.load_timeout_s,
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
                    await background.start(pool.serve_memory_ceiling)
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
