"""One fork server per user: no hash secret, and no memory layout, shared between tenants.

Every process forked from one fork server has its hash secret (`hash("a")` tells a val what
it is) and its memory layout (the addresses `repr()` prints). With one fork server for
everyone, a tenant who reads the secret in their own val knows the secret of every other
tenant's workers, and can send a victim's val keys that all collide in its dicts. So each user
(and anonymous Eval, as the user "") gets a fork server of their own, started with
`python -I` in an empty environment, which gives it a fresh random hash secret and a fresh
address-space layout; their workers are forked from it and share only with each other.

Costs (docs/design.md §5): one more process per active user, and a user's first cold start
waits for their fork server to start. Spare workers (one per recently active user, at most
`pool.prewarm_workers` of them) keep the following cold starts off the fork path, as the
shared prewarmed workers do in the shared mode; a fork server whose workers have all gone is
closed once more than `max_idle_servers` are idle.

Each user's fork server has its own supply (runtime.supply): when it cannot make workers
(wedged, dying at start, at a process limit), that user's requests for a new worker get 503
at once while it backs off, and no other user waits on it.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import trio.lowlevel

from runtime.errors import OverloadedError
from runtime.process import (
    ForkServerHandle,
    SupervisedForkServer,
    WorkerProcess,
)
from runtime.supply import WorkerSupply

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Tenant:
    fork_server: SupervisedForkServer
    supply: WorkerSupply
    spare: WorkerProcess | None = None
    #: Spawns in flight: a fork server is never closed under one.
    busy: int = 0
    refilling: bool = False

    def live_workers(self) -> int:
        handle = self.fork_server.server
        return 0 if handle is None or handle.closed else len(handle.workers)


class TenantForkServers:
    """Workers for a user, from that user's own fork server."""

    def __init__(
        self,
        start: Callable[[], Awaitable[ForkServerHandle]],
        nursery: trio.Nursery,
        *,
        max_spares: int,
        max_idle_servers: int = 8,
        timeout_s: float = 10.0,
    ) -> None:
        self._start = start  # ForkServerHandle.start, its arguments bound
        self._nursery = nursery
        self.max_spares = max_spares
        self.max_idle_servers = max_idle_servers
        #: A worker must come within this; two tries of the fork server fit in it, so a
        #: wedged one is replaced, not merely given up on.
        self.timeout_s = timeout_s
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()  # least recently used first
        self.stats: Counter[str] = Counter()

    @property
    def spares(self) -> int:
        return sum(t.spare is not None for t in self._tenants.values())

    def spare_workers(self) -> list[WorkerProcess]:
        return [t.spare for t in self._tenants.values() if t.spare is not None]

    def supply(self, owner: str) -> WorkerSupply | None:
        tenant = self._tenants.get(owner)
        return None if tenant is None else tenant.supply

    def fork_server(self, owner: str) -> SupervisedForkServer | None:
        tenant = self._tenants.get(owner)
        return None if tenant is None else tenant.fork_server

    async def spawn(self, owner: str) -> WorkerProcess:
        """A generic worker forked from `owner`'s fork server (started if need be), or
        OverloadedError (503) from that user's supply while it cannot make one."""
        tenant = self._tenant(owner)
        spare, tenant.spare = tenant.spare, None
        try:
            if spare is not None and spare.still_running():
                self.stats["spares_used"] += 1
                return spare
            if spare is not None:
                self._nursery.start_soon(spare.aclose)
            tenant.busy += 1
            try:
                worker = await tenant.supply.get()
            finally:
                tenant.busy -= 1
            self.stats["forked_on_demand"] += 1
            return worker
        finally:
            self._refill_soon(owner, tenant)
            self._trim()

    def _tenant(self, owner: str) -> _Tenant:
        tenant = self._tenants.get(owner)
        if tenant is None:
            fork_server = SupervisedForkServer(self._start, spawn_timeout_s=self.timeout_s / 3)
            supply = WorkerSupply(
                fork_server.spawn, timeout_s=self.timeout_s, what=f"workers for {owner!r}"
            )
            tenant = self._tenants[owner] = _Tenant(fork_server, supply)
            self.stats["fork_servers_started"] += 1
        self._tenants.move_to_end(owner)
        return tenant

    def _refill_soon(self, owner: str, tenant: _Tenant) -> None:
        # After the request that used the spare: started now, it would compete for the CPU.
        if self.max_spares and tenant.spare is None and not tenant.refilling:
            tenant.refilling = True
            self._nursery.start_soon(self._refill, owner, tenant)

    async def _refill(self, owner: str, tenant: _Tenant) -> None:
        try:
            await trio.lowlevel.checkpoint()
            if self._tenants.get(owner) is not tenant or not self._recent(owner):
                return
            tenant.busy += 1
            try:
                worker = await tenant.supply.get()
            except OverloadedError:  # a spare is an optimisation; the supply logged why
                return
            finally:
                tenant.busy -= 1
            if tenant.spare is None and self._tenants.get(owner) is tenant:
                tenant.spare = worker
            else:
                await worker.aclose()
        finally:
            tenant.refilling = False

    def _recent(self, owner: str) -> bool:
        """Among the `max_spares` most recently served users."""
        recent = list(self._tenants)[-self.max_spares :] if self.max_spares else []
        return owner in recent

    def _trim(self) -> None:
        """Spares only for the most recent users; idle fork servers beyond the allowance go."""
        owners = list(self._tenants)
        recent = set(owners[-self.max_spares :]) if self.max_spares else set()
        for owner in owners:
            tenant = self._tenants[owner]
            if owner not in recent and tenant.spare is not None:
                spare, tenant.spare = tenant.spare, None
                self._nursery.start_soon(spare.aclose)
        idle = [
            owner
            for owner in owners
            if (t := self._tenants[owner]).busy == 0
            and t.spare is None
            and not t.refilling
            and t.live_workers() == 0
        ]
        for owner in idle[: max(0, len(idle) - self.max_idle_servers)]:  # oldest first
            tenant = self._tenants.pop(owner)
            self.stats["fork_servers_closed"] += 1
            self._nursery.start_soon(tenant.fork_server.aclose)

    async def aclose(self) -> None:
        tenants, self._tenants = list(self._tenants.values()), OrderedDict()
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for tenant in tenants:
                    if tenant.spare is not None:
                        nursery.start_soon(tenant.spare.aclose)
            async with trio.open_nursery() as nursery:
                for tenant in tenants:
                    nursery.start_soon(tenant.fork_server.aclose)
