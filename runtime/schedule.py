"""Schedules: what `PUT /v1/vals/{user}/{val}/schedule` accepts, and when a schedule's next
tick is. Pure: no store, no clock of its own (every function takes `now`).

Two kinds (docs/schedules.md):
    {"cron": "*/5 * * * *", "tz": "Europe/Paris"}   five-field cron, in a time zone (UTC)
    {"every_s": 300}                                every N seconds from when it was set

Cron expressions are parsed and evaluated by cronsim, which follows Debian cron's rules
(day-of-month and day-of-week are OR-ed unless one starts with `*`; DST gaps and repeats).
The tick that `next_tick` answers is always strictly after `after`: ticks missed while no
node ran them collapse into the one that is due, never a replay.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from runtime.errors import BadRequestError

KINDS = ("cron", "every")
# IANA zone names: `Europe/Paris`, `America/Argentina/Buenos_Aires`, `Etc/GMT+5`, `UTC`. Checked
# before zoneinfo sees it: the name becomes a path under the system's zoneinfo directory.
_TZ_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,2}")
MAX_CRON_CHARS = 200
#: How many of a cron expression's coming ticks are checked against min_interval_s.
CRON_GAP_SAMPLES = 100
#: every_s is at most a year: longer is a calendar's job (use cron).
MAX_EVERY_S = 366 * 24 * 3600


def bad_schedule(message: str) -> BadRequestError:
    return BadRequestError(message, "bad_schedule")


@dataclass(frozen=True, slots=True)
class Schedule:
    kind: str  # "cron" or "every"
    expr: str  # the cron expression, or the interval in seconds as digits
    tz: str = "UTC"  # cron only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}")

    @property
    def every_s(self) -> int:
        return int(self.expr)

    def describe(self) -> str:
        """The expression a val sees as `interval.schedule`: the cron line, or `@every 300s`."""
        return self.expr if self.kind == "cron" else f"@every {self.expr}s"

    def to_json(self) -> dict[str, object]:
        if self.kind == "cron":
            return {"cron": self.expr, "tz": self.tz}
        return {"every_s": self.every_s}


def parse_schedule(body: object, min_interval_s: int) -> Schedule:
    """A PUT body -> Schedule, or 400 bad_schedule saying what is wrong."""
    usage = 'send {"cron": "*/5 * * * *"} (and maybe "tz": "Europe/Paris") or {"every_s": 300}'
    if not isinstance(body, dict):
        raise bad_schedule(usage)
    unknown = set(body) - {"cron", "tz", "every_s"}
    if unknown:
        raise bad_schedule(f"unknown field(s) {', '.join(sorted(unknown))}: {usage}")
    if ("cron" in body) == ("every_s" in body):
        raise bad_schedule(f"give exactly one of cron and every_s: {usage}")
    if "every_s" in body:
        if "tz" in body:
            raise bad_schedule("tz applies to cron schedules only")
        every = body["every_s"]
        if type(every) is not int or not min_interval_s <= every <= MAX_EVERY_S:
            raise bad_schedule(
                f"every_s must be a whole number of seconds from {min_interval_s} "
                f"(this service's minimum) to {MAX_EVERY_S}"
            )
        return Schedule("every", str(every))
    expr, tz = body["cron"], body.get("tz", "UTC")
    if not isinstance(expr, str) or not isinstance(tz, str):
        raise bad_schedule("cron and tz must be strings")
    schedule = Schedule("cron", " ".join(expr.split()), check_tz(tz))
    check_cron(schedule, min_interval_s)
    return schedule


def check_tz(name: str) -> str:
    if not _TZ_RE.fullmatch(name) or len(name) > 64:
        raise bad_schedule(f"{name[:80]!r} is not a time zone name such as 'Europe/Paris'")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad_schedule(
            f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'"
        ) from None
    return name


def check_cron(schedule: Schedule, min_interval_s: int) -> None:
    expr = schedule.expr
    if len(expr) > MAX_CRON_CHARS or len(expr.split()) != 5:
        raise bad_schedule(
            f"{expr[:80]!r} is not a five-field cron expression "
            "(minute hour day-of-month month day-of-week, such as '*/5 * * * *')"
        )
    start = datetime.now(UTC).replace(second=0, microsecond=0)
    try:
        ticks = CronSim(expr, start.astimezone(ZoneInfo(schedule.tz)))
        times = [next(ticks).timestamp() for _ in range(CRON_GAP_SAMPLES)]
    except CronSimError as exc:
        raise bad_schedule(f"cron expression {expr!r}: {exc}") from None
    except StopIteration:
        raise bad_schedule(f"cron expression {expr!r} never fires") from None
    gap = min((b - a for a, b in itertools.pairwise(times)), default=math.inf)
    if gap < min_interval_s:
        raise bad_schedule(
            f"cron expression {expr!r} fires {gap:.0f} s apart; this service's minimum "
            f"interval is {min_interval_s} s"
        )


def next_tick(schedule: Schedule, anchor: float, after: float) -> float:
    """The first tick strictly after `after` (Unix time). `anchor` is a tick of an `every`
    schedule (they keep the phase of when they were set); cron ignores it."""
    if schedule.kind == "every":
        if after < anchor:
            return anchor
        every = schedule.every_s
        return anchor + (math.floor((after - anchor) / every) + 1) * every
    zone = ZoneInfo(schedule.tz)
    ticks = CronSim(schedule.expr, datetime.fromtimestamp(math.floor(after), UTC).astimezone(zone))
    while (tick := next(ticks).timestamp()) <= after:
        pass
    return tick


# Claims: which due ticks a node takes. Pure; a store runs it inside its claim transaction.


@dataclass(frozen=True, slots=True)
class Due:
    """A schedule whose tick is due, as the store holds it."""

    val_id: int
    owner: str
    user_id: int
    schedule: Schedule
    next_run_at: float  # the due tick
    last_run_at: float | None
    claim: int  # claims so far
    running_until: float | None  # the lease of a run in progress


@dataclass(frozen=True, slots=True)
class Tick:
    """A due tick, decided: to run (holding lease `claim`), or skipped."""

    val_id: int
    owner: str
    schedule: Schedule
    scheduled_at: float
    last_run_at: float | None  # the run before this one
    claim: int
    skipped: bool
    next_run_at: float  # where the schedule goes next: the first tick after now


def plan_claims(
    due: Sequence[Due],
    now: float,
    limit: int,
    max_running_per_user: int,
    running: Mapping[int, int],
) -> list[Tick]:
    """Decide the due ticks, oldest first: skip those whose previous run holds its lease
    (they move on, a skip takes no slot); run at most `limit`, and none of an owner who has
    `max_running_per_user` runs going (`running`, by user id). The rest stay due."""
    ticks: list[Tick] = []
    taken: dict[int, int] = dict(running)
    claimed = 0
    for row in due:
        following = next_tick(row.schedule, row.next_run_at, now)
        common = (row.val_id, row.owner, row.schedule, row.next_run_at, row.last_run_at)
        if row.running_until is not None and row.running_until > now:
            ticks.append(Tick(*common, row.claim, skipped=True, next_run_at=following))
        elif claimed < limit and taken.get(row.user_id, 0) < max_running_per_user:
            claimed += 1
            taken[row.user_id] = taken.get(row.user_id, 0) + 1
            ticks.append(Tick(*common, row.claim + 1, skipped=False, next_run_at=following))
    return ticks
