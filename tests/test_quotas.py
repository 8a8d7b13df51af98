"""Per-user quotas ([quotas], runtime.quotas): refused in the store's transaction, answered
as 409 quota_exceeded naming the quota and its limit; an env that would not fit in a worker's
load message is refused at write, and one stored too large is a clear error, not a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing

import pytest
import trio

from runtime.config import QuotasConfig, parse_config
from runtime.errors import ConfigError, QuotaError
from runtime.quotas import check_env, env_load_bytes
from runtime.store import AsyncStore, Store
from sandbox.limits import WorkerLimits
from sandbox.wire import DEFAULT_MAX_HEAD_BYTES
from tests.helpers import HELLO, StartService, assert_json_error

SMALL = QuotasConfig(max_vals=3, max_versions_per_val=2, max_env_keys=3, max_env_bytes=1000)


def make(location: str) -> Store:
    store = Store(location)
    store.create_user("alice")
    store.create_user("bob")
    return store


@pytest.fixture
def store(store_location: str) -> Iterator[Store]:
    with closing(make(store_location)) as store:
        yield store


def test_quotas_are_read_from_their_section_and_checked() -> None:
    config = parse_config({"quotas": {"max_vals": 5, "max_env_bytes": 4096}})
    assert config.quotas.max_vals == 5
    assert config.quotas.max_env_bytes == 4096
    for bad in ({"max_vals": 0}, {"max_env_keys": -1}, {"max_versions_per_val": 1.5}):
        with pytest.raises(ConfigError, match=r"quotas\."):
            parse_config({"quotas": bad})
    with pytest.raises(ConfigError, match=r"unknown key quotas\.max_bytes"):
        parse_config({"quotas": {"max_bytes": 1}})


def test_a_new_val_beyond_max_vals_is_refused_and_a_new_version_is_not(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.put_val("alice", name, "x = 1", None, SMALL)
    with pytest.raises(QuotaError) as refused:
        store.put_val("alice", "d", "x = 1", None, SMALL)
    assert (refused.value.quota, refused.value.limit, refused.value.type) == (
        "max_vals",
        3,
        "quota_exceeded",
    )
    store.put_val("alice", "a", "x = 2", None, SMALL)  # a new version of an existing val
    store.put_val("bob", "d", "x = 1", None, SMALL)  # another user's count is their own
    store.delete_val("alice", "c")
    store.put_val("alice", "d", "x = 1", None, SMALL)


def test_versions_beyond_the_quota_drop_the_oldest_and_keep_the_latest(store: Store) -> None:
    for n in range(1, 6):
        saved, _ = store.put_val("alice", "v", f"x = {n}", None, SMALL)
        assert saved.version == n  # numbers are never handed out again
    assert [n for n, _ in store.version_list("alice", "v")] == [4, 5]
    assert store.get_val("alice", "v", 3) is None
    latest = store.get_val("alice", "v", None)
    assert latest is not None
    assert latest.code == "x = 5"


def test_env_keys_and_bytes_are_refused_beyond_their_quotas(store: Store) -> None:
    for key in ("A", "B", "C"):
        store.set_env("alice", key, "v", SMALL)
    with pytest.raises(QuotaError) as refused:
        store.set_env("alice", "D", "v", SMALL)
    assert (refused.value.quota, refused.value.limit) == ("max_env_keys", 3)
    store.set_env("alice", "A", "changed", SMALL)  # replacing a key adds none
    with pytest.raises(QuotaError) as refused:
        store.set_env("alice", "B", "x" * 1000, SMALL)
    assert (refused.value.quota, refused.value.limit) == ("max_env_bytes", 1000)
    assert store.env("alice") == {"A": "changed", "B": "v", "C": "v"}  # nothing changed


@pytest.mark.parametrize(
    "value",
    [
        "\x00" * 200_000,  # JSON writes each as \u0000: six bytes on the wire for one here
        '"' * 600_000,  # two bytes each
        "\\" * 600_000,
        "\ud800" * 200_000,  # a lone surrogate: its escape, six bytes
    ],
    ids=["nul", "quote", "backslash", "surrogate"],
)
def test_an_env_that_would_not_fit_in_a_load_frame_is_refused_whatever_the_quota(
    store: Store, value: str
) -> None:
    generous = QuotasConfig(max_env_bytes=100 * 1024 * 1024)
    with pytest.raises(QuotaError) as refused:
        store.set_env("alice", "BIG", value, generous)
    assert refused.value.quota == "load_message_bytes"
    assert refused.value.limit == DEFAULT_MAX_HEAD_BYTES
    assert store.env("alice") == {}


def test_the_wire_check_measures_what_a_load_would_carry() -> None:
    limits = WorkerLimits()
    env = {"K": "a" * 1000}
    assert 1000 < env_load_bytes(env, limits) < 2000
    generous = QuotasConfig(max_env_bytes=10**9)
    # Each \x01 is six bytes on the wire (\u0001): the largest env that fits, to the byte.
    room = DEFAULT_MAX_HEAD_BYTES - env_load_bytes({"K": ""}, limits)
    fits = {"K": "\x01" * (room // 6)}
    assert env_load_bytes(fits, limits) > DEFAULT_MAX_HEAD_BYTES - 6
    check_env(fits, generous, limits)
    with pytest.raises(QuotaError):
        check_env({"K": "\x01" * (room // 6 + 1)}, generous, limits)


async def test_concurrent_saves_cannot_pass_max_vals(store_location: str) -> None:
    make(store_location).close()
    stores = [AsyncStore(Store(store_location)) for _ in range(4)]  # four connections
    outcomes: list[str] = []

    async def save(i: int) -> None:
        try:
            await stores[i % 4].call(Store.put_val, "alice", f"v{i}", "x = 1", None, SMALL)
            outcomes.append("saved")
        except QuotaError:
            outcomes.append("refused")

    try:
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(save, i)
        assert outcomes.count("saved") == 3
        assert outcomes.count("refused") == 9
        assert len(stores[0].store.list_vals("alice", ("public",))) == 3
    finally:
        for each in stores:
            each.store.close()


async def test_quota_errors_over_http_name_the_quota_and_the_limit(
    start_service: StartService,
) -> None:
    service = await start_service(max_vals=1, max_env_keys=1, max_versions_per_val=2)
    await service.put_val("hello", HELLO)
    # Refused before its code is checked: code that could not load gets the quota's answer.
    response = await service.api("PUT", "/v1/vals/alice/other", content=b"not python(")
    error = assert_json_error(response, 409, "quota_exceeded")
    assert error["quota"] == "max_vals"
    assert response.json()["error"]["limit"] == 1
    assert "max_vals" in error["message"]
    assert (await service.api("PUT", "/v1/env/ONE", content=b"1")).status_code == 200
    response = await service.api("PUT", "/v1/env/TWO", content=b"2")
    error = assert_json_error(response, 409, "quota_exceeded")
    assert error["quota"] == "max_env_keys"
    me = (await service.api("GET", "/v1/me")).json()
    assert me["quotas"]["max_vals"] == 1
    assert me["quotas"]["max_versions_per_val"] == 2
    for n in range(3):
        await service.put_val("hello", HELLO + f"\n# {n}\n")
    listed = (await service.api("GET", "/v1/vals/alice/hello/versions")).json()["versions"]
    assert [v["version"] for v in listed] == [3, 4]
    assert (await service.web("alice", "hello")).status_code == 200
    assert (await service.web("alice", "hello", "/?v=1")).status_code == 404


async def test_an_env_stored_too_large_is_a_clear_error_for_every_val_of_its_owner(
    start_service: StartService,
) -> None:
    service = await start_service()
    await service.put_val("hello", HELLO)
    # Written behind the API's back, as a store from before the check would hold it.
    store = Store(service.db_path)
    store.set_env("alice", "BIG", "\x00" * 200_000)
    store.close()
    await service.api("DELETE", "/v1/env/NONE")  # through the front end: its cache is emptied
    response = await service.web("alice", "hello")
    error = assert_json_error(response, 502, "env_too_large")
    assert "DELETE /v1/env" in error["message"]
    run = await service.api("POST", "/v1/run/alice.hello", user=None, json={"args": []})
    assert_json_error(run, 502, "env_too_large")
    assert (await service.api("DELETE", "/v1/env/BIG")).status_code == 200
    assert (await service.web("alice", "hello")).status_code == 200  # the pool is fine
    health = (await service.api("GET", "/healthz", user=None)).json()
    assert health["status"] == "ok", json.dumps(health)
