"""Prometheus rendering of runtime/metrics.py, as text a scraper would parse."""

from __future__ import annotations

import re

import pytest

from runtime.metrics import Histogram, Metrics

# name{label="value",...} number: the exposition format's sample line, nothing looser.
SAMPLE_RE = re.compile(r'[a-z_]+(\{[a-z_]+="[^"\n]*"(,[a-z_]+="[^"\n]*")*\})? -?[0-9.e+]+')


def samples(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
            continue
        name, _, value = line.rpartition(" ")
        assert SAMPLE_RE.fullmatch(line), line
        found[name] = float(value)
    return found


@pytest.mark.parametrize(
    ("values", "expected_cumulative"),
    [
        ([], [0, 0, 0, 0]),
        ([0.5], [0, 1, 1, 1]),
        ([0.1, 1.0, 5.0], [1, 2, 2, 3]),  # a value on a bound falls in that bound's bucket
        ([0.0, 0.2, 0.9, 99.0], [1, 3, 3, 4]),
    ],
)
def test_histogram_buckets_are_cumulative(
    values: list[float], expected_cumulative: list[int]
) -> None:
    histogram = Histogram((0.1, 1.0, 2.0))
    for value in values:
        histogram.observe(value)
    lines = histogram.lines("h")
    assert [int(line.rpartition(" ")[2]) for line in lines[:4]] == expected_cumulative
    assert lines[3].startswith('h_bucket{le="+Inf"}')
    assert lines[-1] == f"h_count {len(values)}"


def test_render_counts_requests_cold_and_warm_starts_and_kills() -> None:
    metrics = Metrics()
    for status in (200, 200, 404, 502):
        metrics.observe("web", status, 0.003)
    metrics.observe("api", 201, 0.001)
    text = metrics.render(
        {"invocations": 10, "cold_starts": 3, "killed_timeout": 2, "killed_protocol_error": 1},
        {"ready": 4, "idle": 2, "busy": 1, "queued": 5},
    )
    found = samples(text)
    assert found['valrun_requests_total{kind="web",status="200"}'] == 2
    assert found['valrun_requests_total{kind="web",status="502"}'] == 1
    assert found['valrun_request_duration_seconds_count{kind="web"}'] == 4
    assert found['valrun_request_duration_seconds_bucket{kind="web",le="0.005"}'] == 4
    assert found['valrun_request_duration_seconds_bucket{kind="web",le="0.0025"}'] == 0
    assert found['valrun_invocations_total{start="cold"}'] == 3
    assert found['valrun_invocations_total{start="warm"}'] == 7
    assert found['valrun_worker_kills_total{reason="timeout"}'] == 2
    assert found['valrun_worker_kills_total{reason="protocol_error"}'] == 1
    assert found['valrun_workers{state="ready"}'] == 4
    assert found["valrun_queue_depth"] == 5
