"""The pure parts of scripts/loadtest.py, scripts/bench.py and the scripts/loadlib.py they
share: options, the loopback refusal, percentiles, wrk's report, /proc parsing and the targets'
verdicts.

The scripts are not a package (they run as `python scripts/NAME.py`), so they are loaded from
their files; both import loadlib by that name, as they do when run, so it is loaded first.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from runtime.config import parse_config

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


loadlib = _load("loadlib")
loadtest = _load("loadtest")
bench = _load("bench")


# --- loadtest: where load may go -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1", 8080),
        ("http://127.0.0.1:8080/", "127.0.0.1", 8080),
        ("http://127.5.6.7:9000", "127.5.6.7", 9000),
        ("http://localhost:8080", "localhost", 8080),
        ("http://[::1]:8080", "::1", 8080),
        ("http://127.0.0.1", "127.0.0.1", 80),
    ],
)
def test_loopback_targets_are_accepted(url: str, host: str, port: int) -> None:
    assert loadtest.check_target(url) == loadlib.Target(host, port)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:8080",
        "http://192.168.1.10:8080",
        "http://172.16.0.1:8080",
        "http://8.8.8.8",
        "http://0.0.0.0:8080",
        "http://example.com:8080",
        "http://demo-hello.web.localhost:8080",  # a name: it could resolve anywhere
        "http://127.0.0.1.example.com:8080",
        "http://[2001:db8::1]:8080",
    ],
)
def test_non_loopback_targets_are_refused_without_allow_remote(url: str) -> None:
    with pytest.raises(loadtest.UsageError, match="--allow-remote"):
        loadtest.check_target(url)
    assert loadtest.check_target(url, allow_remote=True).port in (80, 8080)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("https://127.0.0.1:8443", "only http://"),
        ("127.0.0.1:8080", "only http://"),
        ("http://127.0.0.1:8080/v1/vals", "without a path"),
        ("http://127.0.0.1:8080/?x=1", "without a path"),
        ("http://127.0.0.1:99999", "malformed port"),
        ("http://:8080", "names no host"),
    ],
)
def test_malformed_urls_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(loadtest.UsageError, match=complaint):
        loadtest.check_target(url, allow_remote=True)


# --- loadtest: options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mix"),
    [
        ("warm=100", {"warm": 100, "cold": 0, "slow": 0, "failing": 0}),
        ("warm=80,cold=5,slow=5,failing=10", {"warm": 80, "cold": 5, "slow": 5, "failing": 10}),
        (" cold = 3 , warm=0 ,", {"warm": 0, "cold": 3, "slow": 0, "failing": 0}),
    ],
)
def test_mix_is_parsed_into_weights(text: str, mix: dict[str, int]) -> None:
    assert loadtest.parse_mix(text) == mix


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("hot=5", "unknown kind 'hot'"),
        ("warm", "whole non-negative weight"),
        ("warm=-1", "whole non-negative weight"),
        ("warm=1.5", "whole non-negative weight"),
        ("warm=0,cold=0", "positive weight"),
        ("", "positive weight"),
    ],
)
def test_bad_mixes_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(loadtest.UsageError, match=complaint):
        loadtest.parse_mix(text)


def test_vals_are_user_slash_val() -> None:
    assert loadtest.parse_vals("demo/hello, demo/counter") == [
        ("demo", "hello"),
        ("demo", "counter"),
    ]
    for bad in ("hello", "demo/", "/hello", "a/b/c", ","):
        with pytest.raises(loadtest.UsageError):
            loadtest.parse_vals(bad)


def test_the_default_mix_depends_on_a_token() -> None:
    without = loadtest.parse_options([], {})
    assert without.mix == {"warm": 100, "cold": 0, "slow": 0, "failing": 0}
    assert without.token is None
    with_env = loadtest.parse_options([], {"VALRUN_TOKEN": "vr_x"})
    assert with_env.mix == loadtest.parse_mix(loadtest.DEFAULT_MIX_WITH_TOKEN)
    assert with_env.token == "vr_x"


def test_cold_slow_and_failing_need_a_token() -> None:
    with pytest.raises(loadtest.UsageError, match="cold, failing: those need --token"):
        loadtest.parse_options(["--mix", "warm=1,cold=1,failing=1"], {})
    options = loadtest.parse_options(["--mix", "slow=1", "--token", "vr_t"], {})
    assert options.token == "vr_t"


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--duration", "0"],
        ["--duration", "7200"],
        ["--timeout", "0"],
        ["--slow-ms", "-1"],
        ["--url", "http://10.1.2.3:8080"],
    ],
)
def test_runaway_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(loadtest.UsageError):
        loadtest.parse_options(argv, {})


# --- loadtest: statistics --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([5.0], 99, 5.0),
        ([1.0, 2.0], 50, 1.5),
        ([3.0, 1.0, 2.0], 0, 1.0),
        ([3.0, 1.0, 2.0], 100, 3.0),
        ([float(i) for i in range(1, 101)], 50, 50.5),
        ([float(i) for i in range(1, 101)], 99, 99.01),
        ([float(i) for i in range(1, 101)], 90, 90.1),
    ],
)
def test_percentile_interpolates_between_ranks(
    values: list[float], q: float, expected: float
) -> None:
    assert loadlib.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_q_must_be_a_percentage() -> None:
    assert math.isnan(loadlib.percentile([], 50))
    with pytest.raises(ValueError, match="outside 0-100"):
        loadlib.percentile([1.0], 101)


def test_a_failing_val_answering_502_is_not_an_error() -> None:
    samples = [
        loadtest.Sample(0.0, "failing", 502, 0.002),
        loadtest.Sample(0.1, "failing", 200, 0.002),
        loadtest.Sample(0.2, "warm", 200, 0.004),
        loadtest.Sample(0.3, "warm", 503, 0.001),
        loadtest.Sample(0.4, "cold", -1, 30.0),
    ]
    assert [s.error for s in samples] == [False, True, False, True, True]
    stats = loadtest.Stats.of(samples)
    assert (stats.requests, stats.errors, stats.max_ms) == (5, 3, 30000.0)
    summary = loadtest.summarize(samples, elapsed_s=1.0)
    assert "failing: 200*: 1, 502: 1" in summary
    assert "cold: timeout*: 1" in summary
    assert "slow" not in summary  # no row for a kind that sent nothing


# --- bench: wrk's report, /proc, verdicts ------------------------------------------------------

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    13.61ms    2.07ms  31.45ms   89.42%
    Req/Sec     1.18k    95.07     1.31k    80.00%
  Latency Distribution
     50%  950.00us
     75%   14.20ms
     90%   15.38ms
     99%    1.02s
  5870 requests in 5.00s, 720.09KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:   1174.46
Transfer/sec:    179.91KB
"""


def test_wrk_report_is_parsed_with_its_units() -> None:
    result = bench.parse_wrk(WRK_OUTPUT)
    assert result.requests_per_s == pytest.approx(1174.46)
    assert result.p50_ms == pytest.approx(0.95)
    assert result.p90_ms == pytest.approx(15.38)
    assert result.p99_ms == pytest.approx(1020.0)
    assert (result.requests, result.bad_responses, result.socket_errors) == (5870, 3, 3)


def test_a_wrk_report_without_percentiles_cannot_be_measured() -> None:
    without_latency = WRK_OUTPUT.replace("  Latency Distribution\n", "").replace("     99%", "")
    with pytest.raises(bench.MeasureError, match="99"):
        bench.parse_wrk(without_latency)


def test_smaps_rollup_is_read_in_kib() -> None:
    text = (
        "55d0c0a00000-7ffc5b5fe000 ---p 00000000 00:00 0   [rollup]\n"
        "Rss:                9876 kB\nPss:                2345 kB\n"
        "Private_Clean:       100 kB\nPrivate_Dirty:      1700 kB\n"
    )
    assert bench.parse_smaps_rollup(text) == {
        "Rss": 9876,
        "Pss": 2345,
        "Private_Clean": 100,
        "Private_Dirty": 1700,
    }


SPAWNED = "python -I -m sandbox.worker"
FORK = "python -I -m sandbox.forkserver"


@pytest.mark.parametrize(
    ("parents", "cmdlines", "workers"),
    [
        # Today: valrun (10) spawns its workers; pytest (1) runs beside it.
        ({10: 1, 11: 10, 12: 10, 20: 1}, {10: "valrun serve", 11: SPAWNED, 12: SPAWNED}, [11, 12]),
        # A fork server (11) under valrun; its forked children keep its command line.
        ({10: 1, 11: 10, 12: 11, 13: 11}, {10: "valrun", 11: FORK, 12: FORK, 13: FORK}, [12, 13]),
        # Someone else's sandbox processes are not valrun's.
        ({10: 1, 30: 1, 31: 30}, {10: "valrun", 30: FORK, 31: FORK}, []),
    ],
)
def test_workers_are_sandbox_processes_below_valrun_with_none_below_them(
    parents: dict[int, int], cmdlines: dict[int, str], workers: list[int]
) -> None:
    assert bench.pick_workers(10, parents, cmdlines) == workers


PROCESS = "python -m runtime.processes 0"


@pytest.mark.parametrize(
    ("parents", "cmdlines", "front"),
    [
        # One process serves: valrun (10) alone, its fork server's processes are not counted.
        ({10: 1, 11: 10, 12: 11}, {10: "valrun serve", 11: FORK, 12: FORK}, [10]),
        # `[server] processes = 2`: the supervisor (10) and the two that serve (11, 12).
        (
            {10: 1, 11: 10, 12: 10, 13: 11, 14: 13, 15: 12, 20: 1},
            {10: "valrun", 11: PROCESS, 12: PROCESS, 13: FORK, 14: FORK, 15: FORK, 20: PROCESS},
            [10, 11, 12],
        ),
    ],
)
def test_front_end_cpu_counts_every_serving_process_and_no_worker(
    parents: dict[int, int], cmdlines: dict[int, str], front: list[int]
) -> None:
    assert bench.front_processes(10, parents, cmdlines) == front


@pytest.mark.parametrize(
    ("value", "limit", "at_least", "passed", "margin"),
    [
        (0.95, 0.9, True, True, 0.05),
        (0.85, 0.9, True, False, -0.05),
        (2.0, 3.0, False, True, 1.0),
        (4.5, 3.0, False, False, -1.5),
        (0, 0, False, True, 0),
    ],
)
def test_a_check_passes_and_reports_its_margin(
    value: float, limit: float, at_least: bool, passed: bool, margin: float
) -> None:
    check = bench.Check("x", value, limit, at_least, "ms")
    assert check.passed is passed
    assert check.margin == pytest.approx(margin)


def test_nothing_measured_reports_no_verdict() -> None:
    options = bench.parse_options(["--quick"])
    assert (options.rounds, options.duration_s) == (1, 2)
    assert bench.checks(bench.Report(options)) == []


@pytest.mark.parametrize(
    "argv", [[], ["--rounds", "5"], ["--many-vals", "3000", "--cold-vals", "80"]]
)
def test_bench_config_leaves_room_for_every_val_the_bench_saves(argv: list[str]) -> None:
    options = bench.parse_options(argv)
    config = parse_config(tomllib.loads(bench.valrun_config(8000, Path("/tmp/x.db"), options)))
    saved = 2 + options.rounds * options.cold_vals + options.many_vals
    assert config.quotas.max_vals >= saved


def test_bench_cpu_spent_counts_new_processes_whole_and_never_goes_negative() -> None:
    before = {10: 5.0, 11: 2.0}  # 11 exits during the run, with its 2 s
    after = {10: 5.5, 12: 0.25}  # 12 started during the run
    assert bench.cpu_spent(before, after) == 0.75
    assert bench.cpu_spent(before, {}) == 0.0
