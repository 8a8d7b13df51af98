"""Schedules without a server: parsing, tick arithmetic, and the claim in a real SQLite file."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runtime.config import ScheduleConfig, parse_config
from runtime.errors import BadRequestError, ConfigError, QuotaError
from runtime.schedule import Due, Schedule, next_tick, parse_schedule, plan_claims
from runtime.store import Store
from sandbox.interval import Interval
from sandbox.messages import MessageError, ScheduledRun
from sandbox.wire import Frame


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# Parsing: pure.


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"cron": "*/5 * * * *"}, Schedule("cron", "*/5 * * * *", "UTC")),
        (
            {"cron": " 0  9 * * 1-5 ", "tz": "Europe/Paris"},
            Schedule("cron", "0 9 * * 1-5", "Europe/Paris"),
        ),
        ({"cron": "0 0 L * *"}, Schedule("cron", "0 0 L * *", "UTC")),
        ({"every_s": 300}, Schedule("every", "300")),
        ({"every_s": 60}, Schedule("every", "60")),
    ],
)
def test_valid_schedules_parse(body: object, expected: Schedule) -> None:
    assert parse_schedule(body, 60) == expected


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "send"),
        ({}, "exactly one"),
        ({"cron": "* * * * *", "every_s": 60}, "exactly one"),
        ({"cron": "* * * * *", "when": 1}, "unknown field(s) when"),
        ({"every_s": 59}, "from 60"),
        ({"every_s": 60.5}, "whole number"),
        ({"every_s": True}, "whole number"),
        ({"every_s": "60"}, "whole number"),
        ({"every_s": 60, "tz": "UTC"}, "cron schedules only"),
        ({"cron": "*/5 * * *"}, "five-field"),
        ({"cron": "0 */5 * * * *"}, "five-field"),  # cronsim takes seconds; valrun does not
        ({"cron": "@daily"}, "five-field"),
        ({"cron": "61 * * * *"}, "Bad minute"),
        ({"cron": "0 0 30 2 *"}, "Bad day-of-month"),
        ({"cron": 5}, "must be strings"),
        ({"cron": "* * * * *", "tz": "../../etc/passwd"}, "not a time zone"),
        ({"cron": "* * * * *", "tz": "/etc/localtime"}, "not a time zone"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "* " * 200 + "*"}, "five-field"),
    ],
)
def test_bad_schedules_are_400_saying_what_is_wrong(body: object, says: str) -> None:
    with pytest.raises(BadRequestError) as raised:
        parse_schedule(body, 60)
    assert raised.value.type == "bad_schedule"
    assert raised.value.status == 400
    assert says in raised.value.message


def test_cron_closer_than_the_minimum_interval_is_refused() -> None:
    assert parse_schedule({"cron": "*/2 * * * *"}, 120).expr == "*/2 * * * *"
    with pytest.raises(BadRequestError, match="fires 60 s apart"):
        parse_schedule({"cron": "0,1 * * * *"}, 120)


def test_schedule_config_defaults_and_refusals() -> None:
    config = parse_config({"schedule": {"min_interval_s": 1, "max_concurrent": 3}})
    assert config.schedule == ScheduleConfig(min_interval_s=1, max_concurrent=3)
    assert ScheduleConfig().enabled
    assert ScheduleConfig().min_interval_s == 60
    with pytest.raises(ConfigError, match=r"schedule\.max_concurrent must be positive"):
        parse_config({"schedule": {"max_concurrent": 0}})
    with pytest.raises(ConfigError, match=r"unknown key schedule\.every"):
        parse_config({"schedule": {"every": 1}})


# Ticks: pure.


@pytest.mark.parametrize(
    ("schedule", "anchor", "after", "expected"),
    [
        # every: keeps the phase of its anchor; strictly after `after`
        (Schedule("every", "300"), 1000.0, 999.0, 1000.0),
        (Schedule("every", "300"), 1000.0, 1000.0, 1300.0),
        (Schedule("every", "300"), 1000.0, 1299.5, 1300.0),
        (Schedule("every", "300"), 1000.0, 1000.0 + 300 * 1000 + 1, 1000.0 + 300 * 1001),
        # cron in UTC
        (Schedule("cron", "*/5 * * * *"), 0, utc("2026-03-01T10:02:30"), utc("2026-03-01T10:05")),
        (Schedule("cron", "*/5 * * * *"), 0, utc("2026-03-01T10:05"), utc("2026-03-01T10:10")),
        (Schedule("cron", "0 0 L * *"), 0, utc("2026-02-10T00:00"), utc("2026-02-28T00:00")),
        # 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer
        (
            Schedule("cron", "0 9 * * *", "Europe/Paris"),
            0,
            utc("2026-01-10T12:00"),
            utc("2026-01-11T08:00"),
        ),
        (
            Schedule("cron", "0 9 * * *", "Europe/Paris"),
            0,
            utc("2026-07-10T12:00"),
            utc("2026-07-11T07:00"),
        ),
        # 02:30 does not exist in Paris on 2026-03-29 (clocks jump 02:00 -> 03:00): Debian
        # cron runs it at the jump
        (
            Schedule("cron", "30 2 * * *", "Europe/Paris"),
            0,
            utc("2026-03-28T12:00"),
            utc("2026-03-29T01:00"),
        ),
    ],
)
def test_next_tick(schedule: Schedule, anchor: float, after: float, expected: float) -> None:
    assert next_tick(schedule, anchor, after) == expected


# Claims: pure.


def test_plan_claims_skips_leased_takes_free_slots_and_respects_owner_caps() -> None:
    every = Schedule("every", "10")

    def due(val_id: int, user_id: int, lease: float | None = None) -> Due:
        return Due(val_id, f"u{user_id}", user_id, every, 100.0, None, 7, lease)

    rows = [due(1, 1, lease=200.0), due(2, 1), due(3, 1), due(4, 2), due(5, 3), due(6, 4)]
    ticks = plan_claims(rows, 105.0, limit=3, max_running_per_user=2, running={1: 1})
    assert [(t.val_id, t.skipped, t.claim) for t in ticks] == [
        (1, True, 7),  # its run holds the lease: skipped, takes no slot
        (2, False, 8),  # user 1 had one run going: one more
        (4, False, 8),  # user 1 at the cap: 3 waits
        (5, False, 8),  # the third slot; 6 waits
    ]
    assert all(t.next_run_at == 110.0 and t.scheduled_at == 100.0 for t in ticks)
    assert plan_claims(rows, 105.0, limit=0, max_running_per_user=2, running={}) == ticks[:1]


# The interval object the worker hands a val.


def test_a_scheduled_run_message_carries_the_interval_and_refuses_malformed_ones() -> None:
    run = ScheduledRun(7, 10.0, None, "@every 60s")
    assert ScheduledRun.from_frame(run.to_frame()) == run
    head = {"op": "cron", "id": 1, "scheduled_at": 10, "last_run_at": None, "schedule": "x"}
    assert ScheduledRun.from_frame(Frame(head)).scheduled_at == 10.0
    for bad in (
        {**head, "scheduled_at": "1"},
        {**head, "scheduled_at": float("inf")},
        {**head, "last_run_at": True},
        {**head, "schedule": 5},
        {"op": "cron", "id": 1},
    ):
        with pytest.raises(MessageError):
            ScheduledRun.from_frame(Frame(bad))


def test_the_interval_a_val_sees_is_read_only_and_final() -> None:
    interval = Interval(10.0, None, "@every 60s")
    assert (interval.scheduled_at, interval.last_run_at, interval.schedule) == (
        10.0,
        None,
        "@every 60s",
    )
    with pytest.raises(AttributeError):
        interval.schedule = "x"
    with pytest.raises(TypeError):
        type("Sub", (Interval,), {})


# The store: claims in a real SQLite file.


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "valrun.db")
    for user in ("alice", "bob"):
        store.create_user(user)
    return store


def scheduled_val(store: Store, owner: str, name: str, schedule: Schedule, now: float) -> int:
    val, _ = store.put_val(owner, name, f"def {name}(i):\n    pass\n", None)
    saved = store.put_schedule(val.val_id, schedule, now, max_per_user=50)
    assert saved is not None
    return val.val_id


EVERY_10 = Schedule("every", "10")


def test_a_due_tick_is_claimed_once_and_moves_past_now(store: Store) -> None:
    val_id = scheduled_val(store, "alice", "a", EVERY_10, now=1000.0)
    info = store.schedule_of(val_id)
    assert info is not None
    assert info.next_run_at == 1010.0
    assert info.last_run_at is None
    assert store.claim_due(1009.0, 8, 60.0, 2) == ([], 1010.0, {})
    ticks, next_due, vals = store.claim_due(1010.5, 8, 60.0, 2)
    assert [(t.val_id, t.scheduled_at, t.last_run_at, t.skipped) for t in ticks] == [
        (val_id, 1010.0, None, False)
    ]
    assert next_due == 1020.0
    assert vals[val_id][0].name == "a"
    assert store.claim_due(1010.5, 8, 60.0, 2)[0] == []  # claimed: not again
    store.finish_runs([(val_id, ticks[0].claim)])
    info = store.schedule_of(val_id)
    assert info is not None
    assert info.last_run_at == 1010.5


def test_a_tick_that_comes_while_the_run_holds_its_lease_is_skipped(store: Store) -> None:
    val_id = scheduled_val(store, "alice", "a", EVERY_10, now=1000.0)
    (first,), _, _ = store.claim_due(1010.0, 8, 60.0, 2)
    (second,), _, vals = store.claim_due(1020.0, 8, 60.0, 2)
    assert second.skipped
    assert second.scheduled_at == 1020.0
    assert vals == {}
    # The run's end is told to the next claim, which frees the lease first.
    (third,), _, _ = store.claim_due(1030.0, 8, 60.0, 2, finished=[(val_id, first.claim)])
    assert not third.skipped
    assert third.last_run_at == 1010.0
    # A stale end (an older claim) does not free the lease of the run now going.
    (fourth,), _, _ = store.claim_due(1040.0, 8, 60.0, 2, finished=[(val_id, first.claim)])
    assert fourth.skipped


def test_a_lease_left_by_a_dead_node_expires(store: Store) -> None:
    scheduled_val(store, "alice", "a", EVERY_10, now=1000.0)
    store.claim_due(1010.0, 8, 15.0, 2)  # never finished
    assert store.claim_due(1020.0, 8, 15.0, 2)[0][0].skipped
    assert not store.claim_due(1030.0, 8, 15.0, 2)[0][0].skipped


def test_missed_ticks_collapse_into_one_catch_up_run(store: Store) -> None:
    val_id = scheduled_val(store, "alice", "a", EVERY_10, now=1000.0)
    ticks, next_due, _ = store.claim_due(5005.0, 8, 60.0, 2)  # ~400 ticks missed
    assert [(t.scheduled_at, t.skipped) for t in ticks] == [(1010.0, False)]
    assert next_due == 5010.0  # the phase is kept; nothing in between is replayed
    store.finish_runs([(val_id, ticks[0].claim)])
    assert store.claim_due(5009.0, 8, 60.0, 2)[0] == []


def test_a_claim_takes_no_more_than_the_free_slots_and_a_user_waits_at_their_cap(
    store: Store,
) -> None:
    alice = [scheduled_val(store, "alice", f"a{i}", EVERY_10, now=1000.0) for i in range(4)]
    bob = scheduled_val(store, "bob", "b", EVERY_10, now=1000.0)
    ticks, next_due, _ = store.claim_due(1010.0, 8, 60.0, 2)
    taken = {t.val_id for t in ticks}
    assert len(taken & set(alice)) == 2
    assert bob in taken
    assert len(ticks) == 3
    assert next_due == 1010.0  # alice's two others are still due
    assert store.claim_due(1010.0, 8, 60.0, 2)[0] == []  # still at her cap
    done = next(t for t in ticks if t.val_id in alice)
    again, _, _ = store.claim_due(1011.0, 1, 60.0, 2, finished=[(done.val_id, done.claim)])
    assert len(again) == 1
    assert again[0].val_id in set(alice) - taken
    assert store.claim_due(1011.0, 0, 60.0, 2)[0] == []  # no free slot: nothing


def test_a_deleted_val_or_removed_schedule_never_fires_even_if_due(store: Store) -> None:
    kept = scheduled_val(store, "alice", "kept", EVERY_10, now=1000.0)
    scheduled_val(store, "alice", "gone", EVERY_10, now=1000.0)
    removed = scheduled_val(store, "alice", "removed", EVERY_10, now=1000.0)
    assert store.delete_val("alice", "gone") is not None
    assert store.delete_schedule(removed)
    assert not store.delete_schedule(removed)
    ticks, _, vals = store.claim_due(1010.0, 8, 60.0, 5)
    assert [t.val_id for t in ticks] == [kept]
    assert list(vals) == [kept]


def test_the_claimed_val_is_the_latest_version_with_the_owners_env(store: Store) -> None:
    val_id = scheduled_val(store, "alice", "a", EVERY_10, now=1000.0)
    store.put_val("alice", "a", "def a(i):\n    return 2\n", None)
    store.set_env("alice", "KEY", "value")
    _, _, vals = store.claim_due(1010.0, 8, 60.0, 2)
    val, env = vals[val_id]
    assert (val.version, env) == (2, {"KEY": "value"})


def test_schedules_per_user_are_limited(store: Store) -> None:
    vals = [store.put_val("alice", f"v{i}", "x = 1\n", None)[0].val_id for i in range(3)]
    for val_id in vals[:2]:
        assert store.put_schedule(val_id, EVERY_10, 0.0, max_per_user=2) is not None
    with pytest.raises(QuotaError, match="at most 2"):
        store.put_schedule(vals[2], EVERY_10, 0.0, max_per_user=2)
    replaced = store.put_schedule(vals[0], Schedule("every", "20"), 5.0, max_per_user=2)
    assert replaced is not None
    assert replaced[1] is False
    assert replaced[0].next_run_at == 25.0


def test_two_connections_racing_claim_each_tick_once(tmp_path: Path, store: Store) -> None:
    ids = [scheduled_val(store, "alice", f"v{i}", EVERY_10, now=1000.0) for i in range(40)]
    claimed: list[list[tuple[int, float]]] = [[], []]

    def node(index: int) -> None:
        other = Store(tmp_path / "valrun.db")
        try:
            for step in range(30):
                ticks, _, _ = other.claim_due(1010.0 + step * 10, 8, 0.001, 100)
                claimed[index] += [(t.val_id, t.scheduled_at) for t in ticks if not t.skipped]
        finally:
            other.close()

    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = claimed[0] + claimed[1]
    assert len(every) == len(set(every))  # no tick twice
    assert {val_id for val_id, _ in every} == set(ids)


# The worker's `cron` op, as a real subprocess.


def test_worker_calls_the_export_with_an_interval_and_drops_what_it_returns() -> None:
    from tests.helpers import load_frame, run_worker

    source = """
        def f(interval):
            print(interval.scheduled_at, interval.last_run_at, interval.schedule)
            try:
                interval.schedule = "* * * * *"
            except (AttributeError, TypeError):  # the write guard refuses it first
                print("read-only")
            return {1, 2}  # not JSON: nobody reads it
    """
    run = run_worker(load_frame(source), ScheduledRun(1, 60.0, 0.5, "@every 60s").to_frame())
    loaded, reply = run.frames
    assert loaded.head["op"] == "loaded"
    assert reply.head["op"] == "result"
    assert reply.head["id"] == 1
    assert reply.body == b"null"
    assert reply.head["log"] == "60.0 0.5 @every 60s\nread-only\n"


def test_worker_cron_failures_are_the_vals_and_a_malformed_run_ends_the_worker() -> None:
    from tests.helpers import load_frame, run_worker

    def tick(request_id: int) -> Frame:
        return ScheduledRun(request_id, 1.0, None, "x").to_frame()

    not_callable = run_worker(load_frame("f = 1"), tick(1))
    assert not_callable.frames[1].head["type"] == "val_error"
    assert "must export a function" in str(not_callable.frames[1].head["message"])
    raises = run_worker(load_frame("def f(i):\n    1 / 0"), tick(2))
    assert raises.frames[1].head["type"] == "val_error"
    broken = run_worker(load_frame("def f(i):\n    pass"), Frame({"op": "cron", "id": 3}))
    assert len(broken.frames) == 1
    assert broken.returncode == 2
