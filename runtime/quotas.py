"""Per-user quotas on what the store keeps (`[quotas]`), and the one hard bound on an env:
it must fit in the message that loads a worker. Pure; the store applies these inside the
transaction of the write they bound (runtime.store), so concurrent writes cannot pass them.

An env travels to every worker of its owner in the head of a `load` frame, whose size the
worker's decoder bounds (sandbox.wire.DEFAULT_MAX_HEAD_BYTES). An env over it would make
every val of the account fail to load, so a write that would not fit is refused, whatever
`max_env_bytes` says, and an env stored before this check (or under another config) is a
clear error when a worker is loaded (`check_load_fits`), not a worker that dies silently.
"""

from __future__ import annotations

from runtime.config import QuotasConfig
from runtime.errors import QuotaError, WorkerError
from sandbox.limits import WorkerLimits
from sandbox.messages import Load
from sandbox.wire import DEFAULT_MAX_HEAD_BYTES, Frame, encode_frame

#: The longest name a `load` can carry (runtime.hosts.VAL_RE: 48 characters).
LONGEST_NAME = "v" * 48


def quota_error(quota: str, limit: int, message: str) -> QuotaError:
    """A refusal naming the quota and its limit (409 quota_exceeded, with both as fields)."""
    return QuotaError(message, "quota_exceeded", quota=quota, limit=limit)


def head_bytes(frame: Frame) -> int:
    """The size of a frame's head on the wire (the 8-byte prefix and the body aside)."""
    return len(encode_frame(Frame(frame.head))) - 8


def env_load_bytes(env: dict[str, str], limits: WorkerLimits) -> int:
    """The head of the largest `load` this env would travel in (the code is in the body)."""
    load = Load(LONGEST_NAME, "", "module", tuple(sorted(env.items())), limits)
    return head_bytes(load.to_frame())


def env_bytes(env: dict[str, str]) -> int:
    """What an env weighs against `max_env_bytes`: its keys and values in UTF-8."""
    return sum(len(k.encode()) + len(v.encode("utf-8", "surrogatepass")) for k, v in env.items())


def check_env(env: dict[str, str], quotas: QuotasConfig, limits: WorkerLimits) -> None:
    """Refuse an env (as it would be after a write) over a quota or the wire's limit."""
    if len(env) > quotas.max_env_keys:
        raise quota_error(
            "max_env_keys",
            quotas.max_env_keys,
            f"an env may hold at most {quotas.max_env_keys} keys (quotas.max_env_keys); "
            "delete one first",
        )
    size = env_bytes(env)
    if size > quotas.max_env_bytes:
        raise quota_error(
            "max_env_bytes",
            quotas.max_env_bytes,
            f"the env would be {size} bytes, over the {quotas.max_env_bytes}-byte quota "
            "(quotas.max_env_bytes, keys and values together)",
        )
    wire = env_load_bytes(env, limits)
    if wire > DEFAULT_MAX_HEAD_BYTES:
        raise quota_error(
            "load_message_bytes",
            DEFAULT_MAX_HEAD_BYTES,
            f"the env would take {wire} bytes in the message that loads a worker, over its "
            f"{DEFAULT_MAX_HEAD_BYTES}-byte limit (values full of characters JSON escapes "
            "weigh up to six times their size): make it smaller",
        )


def check_load_fits(load: Load) -> None:
    """Refuse, with a clear error, a `load` whose head the worker could not receive: an env
    stored too large (before the check at write, or under another config)."""
    size = head_bytes(load.to_frame())
    if size > DEFAULT_MAX_HEAD_BYTES:
        raise WorkerError(
            f"the owner's env takes {size} bytes in the message that loads a worker, over "
            f"its {DEFAULT_MAX_HEAD_BYTES}-byte limit, so no val of theirs can load: its "
            "owner must remove env keys (DELETE /v1/env/KEY)",
            "env_too_large",
        )
