"""`Interval`: what a scheduled val's export is called with (Val Town's interval object).

Handed to untrusted code, so it is built as `sandbox.http.Request` is: state in underscore
slots (which RestrictedPython code cannot name), read-only properties over plain values, no
subclasses.
"""

from __future__ import annotations

import json

from sandbox.errors import BadMessageError


class Interval:
    __slots__ = ("_last_run_at", "_schedule", "_scheduled_at")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Interval cannot be subclassed")

    def __init__(self, scheduled_at: float, last_run_at: float | None, schedule: str) -> None:
        self._scheduled_at = scheduled_at
        self._last_run_at = last_run_at
        self._schedule = schedule

    #: The tick this run is for (Unix time); a catch-up run's is the first tick it stands for.
    scheduled_at = property(lambda self: self._scheduled_at)
    #: When the previous run of this schedule was claimed (it started then, or as soon as a
    #: slot was free), as Unix time; None before the first run.
    last_run_at = property(lambda self: self._last_run_at)
    #: The schedule: a cron expression, or `@every 300s`.
    schedule = property(lambda self: self._schedule)

    def __repr__(self) -> str:
        return f"<Interval {self._schedule!r} at {self._scheduled_at}>"

    @classmethod
    def from_body(cls, body: bytes) -> Interval:
        """The body of a `cron` frame: `{"scheduled_at", "last_run_at", "schedule"}`."""
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadMessageError("'cron' body is not JSON") from None
        if not isinstance(fields, dict) or set(fields) != {
            "scheduled_at",
            "last_run_at",
            "schedule",
        }:
            raise BadMessageError("'cron' body must hold scheduled_at, last_run_at, schedule")
        scheduled_at, last_run_at, schedule = (
            fields["scheduled_at"],
            fields["last_run_at"],
            fields["schedule"],
        )
        if not (
            type(scheduled_at) in (int, float)
            and (last_run_at is None or type(last_run_at) in (int, float))
            and isinstance(schedule, str)
        ):
            raise BadMessageError("'cron' body fields have the wrong types")
        return cls(
            float(scheduled_at), None if last_run_at is None else float(last_run_at), schedule
        )
