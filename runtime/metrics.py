"""Prometheus metrics (text exposition format 0.0.4). Pure: counts in, text out.

The app observes each request; the pool keeps its own counters (`Pool.stats`) and gauges,
which are read at scrape time rather than copied on every event.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping

from runtime.http import RouteLabel

# Seconds. Warm vals answer in about a millisecond; the wall-time limit is 10 s by default.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds a scheduled run started after its tick: the scheduler looks every 0.5 s at most;
# a catch-up run after downtime is as late as the downtime was long.
LATENESS_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SCHEDULED_OUTCOMES = ("ok", "error", "skipped")


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total!r}", f"{name}_count{suffix} {running}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        #: Vals' fetches by outcome, counted by `runtime.fetch.Fetcher` (its `outcomes`).
        self.fetches: Counter[str] = Counter()
        self.scheduled: Counter[str] = Counter()
        self.schedule_lateness = Histogram(LATENESS_BUCKETS_S)

    def observe_scheduled(self, outcome: str, lateness_s: float | None = None) -> None:
        """One tick: run (`ok` or `error`, started `lateness_s` after its time) or skipped."""
        self.scheduled[outcome] += 1
        if lateness_s is not None:
            self.schedule_lateness.observe(lateness_s)

    def observe(self, label: RouteLabel, status: int, seconds: float) -> None:
        """One finished request; `label` says what answered it (its `kind` in the output)."""
        self.requests[(label, status)] += 1
        histogram = self.latency.get(label)
        if histogram is None:
            histogram = self.latency[label] = Histogram()
        histogram.observe(seconds)

    def render(self, pool_stats: Mapping[str, int], pool_gauges: Mapping[str, int]) -> str:
        lines = [
            "# HELP valrun_requests_total Requests answered, by kind and status.",
            "# TYPE valrun_requests_total counter",
        ]
        for (label, status), count in sorted(self.requests.items()):
            lines.append(f'valrun_requests_total{{kind="{label}",status="{status}"}} {count}')
        lines += [
            "# HELP valrun_request_duration_seconds Time from request to response, by kind.",
            "# TYPE valrun_request_duration_seconds histogram",
        ]
        for label, histogram in sorted(self.latency.items()):
            lines += histogram.lines("valrun_request_duration_seconds", f'kind="{label}"')
        invocations = pool_stats.get("invocations", 0)
        cold = pool_stats.get("cold_starts", 0)
        lines += [
            "# HELP valrun_invocations_total Val invocations, by how their worker was found.",
            "# TYPE valrun_invocations_total counter",
            f'valrun_invocations_total{{start="cold"}} {cold}',
            f'valrun_invocations_total{{start="warm"}} {max(invocations - cold, 0)}',
            "# HELP valrun_worker_kills_total Workers killed or retired early, by reason.",
            "# TYPE valrun_worker_kills_total counter",
        ]
        for key, count in sorted(pool_stats.items()):
            if key.startswith("killed_"):
                lines.append(f'valrun_worker_kills_total{{reason="{key[7:]}"}} {count}')
        lines += [
            "# HELP valrun_pipelined_total Requests sent to a busy worker behind its current one.",
            "# TYPE valrun_pipelined_total counter",
            f"valrun_pipelined_total {pool_stats.get('pipelined', 0)}",
            "# HELP valrun_pipelined_sent_again_total Pipelined requests whose worker went before"
            " their turn, sent again to another.",
            "# TYPE valrun_pipelined_sent_again_total counter",
            f"valrun_pipelined_sent_again_total {pool_stats.get('pipelined_sent_again', 0)}",
            "# HELP valrun_workers Live workers, by state.",
            "# TYPE valrun_workers gauge",
        ]
        for state in ("ready", "busy", "idle"):
            lines.append(f'valrun_workers{{state="{state}"}} {pool_gauges.get(state, 0)}')
        lines += [
            "# HELP valrun_queue_depth Requests waiting for a val's worker.",
            "# TYPE valrun_queue_depth gauge",
            f"valrun_queue_depth {pool_gauges.get('queued', 0)}",
            "# HELP valrun_workers_evicted_total Idle warm workers evicted to make room.",
            "# TYPE valrun_workers_evicted_total counter",
            f"valrun_workers_evicted_total {pool_stats.get('evicted_lru', 0)}",
            "# HELP valrun_fetches_total Vals' outbound HTTP requests (std.fetch), by outcome.",
            "# TYPE valrun_fetches_total counter",
        ]
        for outcome, count in sorted(self.fetches.items()):
            lines.append(f'valrun_fetches_total{{outcome="{outcome}"}} {count}')
        lines += [
            "# HELP valrun_scheduled_runs_total Scheduled ticks, by outcome (skipped: the "
            "previous run was still going).",
            "# TYPE valrun_scheduled_runs_total counter",
        ]
        for outcome in SCHEDULED_OUTCOMES:
            lines.append(
                f'valrun_scheduled_runs_total{{outcome="{outcome}"}} {self.scheduled[outcome]}'
            )
        lines += [
            "# HELP valrun_schedule_lateness_seconds Time from a tick to the start of its run.",
            "# TYPE valrun_schedule_lateness_seconds histogram",
            *self.schedule_lateness.lines("valrun_schedule_lateness_seconds"),
        ]
        return "\n".join(lines) + "\n"
