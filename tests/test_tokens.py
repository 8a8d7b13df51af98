"""API tokens (docs/contract.md §1.4): several per user, stored only as hashes, revocable; on
the store, through the real server, and with `valrun token`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from runtime.errors import MissingError
from runtime.store import Store, User
from tests.helpers import Service, assert_json_error, valrun


@pytest.fixture
def store(store_location: str) -> Iterator[Store]:
    store = Store(store_location)
    yield store
    store.close()


def test_a_user_may_hold_several_tokens(store: Store) -> None:
    first = store.create_user("alice")
    second, third = store.create_token("alice"), store.create_token("alice")
    assert len({first, second, third}) == 3
    for token in (first, second, third):
        user = store.user_for_token(token)
        assert user is not None
        assert user.name == "alice"
    assert [t.id for t in store.tokens("alice")] == [1, 2, 3]


def test_tokens_are_stored_only_as_hashes(
    store: Store, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tokens = [store.create_user("alice"), store.create_token("alice")]
    stored = [row[0] for row in store._db.execute("SELECT hash FROM tokens ORDER BY id")]
    assert stored == [hashlib.sha256(t.encode()).digest() for t in tokens]
    files = list(tmp_path.glob("store.db*"))
    if store.postgres:  # the whole cluster's files, written out
        store._db.execute("CHECKPOINT")
        files = [p for p in request.getfixturevalue("pg_cluster").root.rglob("*") if p.is_file()]
    assert files
    on_disk = b"".join(path.read_bytes() for path in files)
    for token in tokens:
        assert token.encode() not in on_disk
        assert token.removeprefix("vr_").encode() not in on_disk


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: t[:-1], id="shorter"),
        pytest.param(lambda t: t + "x", id="longer"),
        pytest.param(lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), id="last-char"),
        pytest.param(lambda t: t.upper(), id="upper"),
        pytest.param(lambda t: "", id="empty"),
    ],
)
def test_only_the_exact_token_is_valid(store: Store, mangle: Callable[[str], str]) -> None:
    token = store.create_user("alice")
    assert store.user_for_token(token) is not None
    assert store.user_for_token(mangle(token)) is None


def test_a_revoked_token_is_no_longer_valid_and_the_others_are(store: Store) -> None:
    kept, revoked = store.create_user("alice"), store.create_token("alice")
    store.revoke_token(2)
    assert store.user_for_token(revoked) is None
    assert store.user_for_token(kept) == User(1, "alice")
    infos = store.tokens("alice")
    assert [info.revoked_at is None for info in infos] == [True, False]
    with pytest.raises(MissingError):
        store.revoke_token(2)  # already revoked
    with pytest.raises(MissingError):
        store.revoke_token(99)


async def test_revoking_takes_effect_on_the_next_request(service: Service) -> None:
    store = Store(service.db_path)
    try:
        spare = store.create_token("alice")
        (first, *_) = store.tokens("alice")
        store.revoke_token(first.id)  # the token the test service handed out
    finally:
        store.close()
    with trio.fail_after(10):
        revoked = await service.api("GET", "/v1/me")
        still_good = await service.api(
            "GET", "/v1/me", user=None, headers={"authorization": f"Bearer {spare}"}
        )
    error = assert_json_error(revoked, 401, "unauthorized")
    assert "not valid" in error["message"]
    assert still_good.json()["username"] == "alice"


async def test_cli_token_create_list_revoke(service: Service) -> None:
    created = await valrun(service, "token", "create", "alice")
    assert created.returncode == 0, created.stderr
    token = created.stdout.decode().splitlines()[-1]
    me = await service.api("GET", "/v1/me", user=None, headers={"authorization": f"Bearer {token}"})
    assert me.json()["username"] == "alice"

    listed = await valrun(service, "token", "list", "alice")
    lines = listed.stdout.decode().splitlines()
    assert len(lines) == 2  # the service's token for alice, and the new one
    assert all(line.endswith("\tactive") for line in lines)
    assert token not in listed.stdout.decode()
    new_id = lines[1].split("\t")[0]

    revoked = await valrun(service, "token", "revoke", new_id)
    assert revoked.returncode == 0, revoked.stderr
    after = (await valrun(service, "token", "list", "alice")).stdout.decode().splitlines()
    assert after[0].endswith("\tactive")
    assert "\trevoked " in after[1]
    me = await service.api("GET", "/v1/me", user=None, headers={"authorization": f"Bearer {token}"})
    assert_json_error(me, 401, "unauthorized")
    assert (await service.api("GET", "/v1/me")).status_code == 200  # the other one still works

    again = await valrun(service, "token", "revoke", new_id)
    assert again.returncode == 2
    assert f"no active token with id {new_id}".encode() in again.stderr
    nobody = await valrun(service, "token", "create", "nobody")
    assert nobody.returncode == 2
    assert b"no user" in nobody.stderr
