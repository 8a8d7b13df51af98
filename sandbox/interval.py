"""`Interval`: what a scheduled val's export is called with (Val Town's interval object).

Handed to untrusted code, so it is built as `sandbox.http.Request` is: state in underscore
slots (which RestrictedPython code cannot name), read-only properties over plain values, no
subclasses.
"""

from __future__ import annotations


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
