"""Resource limits: the per-invocation CPU budget every worker arms, and the process limits a
worker started on its own applies to itself before it runs any val code.

Only the OS stops a val that spins in a C loop (`all(range(10**12))`) or swallows every
exception: RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one, and no
Python code runs in between. The front end's wall-time kill is the other half.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass, fields

MIB = 1024 * 1024
SERVING_NICE = 10


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """The limits a worker enforces on itself. The front end's `[limits]` config extends this
    class (runtime.config.LimitsConfig), so a limit added here is a config key, is sent in
    every `Load` and is in force in the worker: one edit."""

    memory_mb: int = 256
    cpu_time_s: int = 10  # per invocation
    worker_cpu_time_s: int = 600  # over the worker's life; it retires before reaching it
    max_log_bytes: int = 64 * 1024
    max_response_body_bytes: int = 5 * MIB
    max_source_bytes: int = 256 * 1024
    open_files: int = 64
    #: Query parameters and form fields in one request (sandbox.fields): each is hashed.
    max_request_fields: int = 1000
    #: Object keys in one JSON document a client sends (Run args, `req.json()`), and in one
    #: object of it: a dict of n colliding keys costs n² to build.
    max_json_keys: int = 10000
    max_json_object_keys: int = 1000
    #: Vals importing vals (sandbox.imports): how deep a chain of imports may nest, and how
    #: many bytes of imported source one worker may load in all.
    max_import_depth: int = 8
    max_import_bytes: int = 1 * MIB

    @classmethod
    def from_head(cls, raw: object) -> WorkerLimits:
        if not isinstance(raw, dict):
            return cls()
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        if not all(type(v) is int and v > 0 for v in known.values()):
            raise ValueError(f"limits must be positive ints: {raw!r}")
        return cls(**known)

    def to_head(self) -> dict[str, int]:
        # The worker's fields only, also when `self` is the front end's larger config.
        return {f.name: getattr(self, f.name) for f in fields(WorkerLimits)}


def apply_limits(limits: WorkerLimits) -> None:
    """Lower this process's rlimits, for a worker started on its own (`python -m
    sandbox.worker`); forked workers get theirs from sandbox.confine's rlimits layer."""
    memory = limits.memory_mb * MIB
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Vals have no files to write; the protocol pipes are not regular files.
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    hard = limits.worker_cpu_time_s
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))  # arm_cpu_limit sets the soft one
    # Below the front end, so a val spinning at 100 % CPU slows its neighbours least. Forked
    # workers are there already (the fork server runs at this nice); spawned ones move now.
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, SERVING_NICE)


def cpu_used_s() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_utime + usage.ru_stime) + 1


def arm_cpu_limit(limits: WorkerLimits) -> bool:
    """Give the next invocation its CPU budget; False when the worker's life budget is spent."""
    used = cpu_used_s()
    if used + limits.cpu_time_s > limits.worker_cpu_time_s:
        return False
    resource.setrlimit(resource.RLIMIT_CPU, (used + limits.cpu_time_s, limits.worker_cpu_time_s))
    return True
