"""`std`: what a val may ask the front end to do for it, as one facade made per worker.

A worker has no network and no files. Each member of `std` sends an `Ask` message over the
worker's socket (`sandbox.worker.Channel.ask`) and blocks until the front end answers; the
front end does the work under the owner's limits (`runtime.broker`). The facade is made per
worker because its members hold that worker's channel; it is importable like the shared
facades (`from std import ...`).
"""

from __future__ import annotations

from typing import Protocol

from sandbox.facades import Facade
from sandbox.fetch import make_fetch
from sandbox.limits import WorkerLimits
from sandbox.messages import Ask, M
from sandbox.storage import make_storage


class Asker(Protocol):
    """Sends an ask and returns the answer, read as the kind given (`Channel.ask`)."""

    def __call__(self, ask: Ask, answer: type[M], /) -> M: ...


def make_std(ask: Asker, limits: WorkerLimits | None = None) -> Facade:
    members: dict[str, object] = {}
    # Each capability adds its members here: outbound HTTP (fetch), storage (blob, sqlite).
    members.update(make_fetch(ask))
    # An ask is one frame, read by the front end up to the response-body limit.
    members.update(make_storage(ask, (limits or WorkerLimits()).max_response_body_bytes))
    return Facade("std", members)
