"""The authorization matrix (docs/contract.md §5), through the real server.

Each cell (action x privacy x caller) is its own test, with its own service and val.

A private val is invisible to everyone but its owner: 404, never 403, so its existence is not
revealed. Writes need the owner's token: another user gets 403, no token 401. Records are the
owner's: another user gets 403 for a val whose code they may read, 404 for a private one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio

from tests.helpers import Service

PRIVACIES = ("public", "unlisted", "private")
TOKEN_HEADERS: dict[str, dict[str, str]] = {
    "owner": {},  # alice's own token, the default of Service.api
    "other": {},
    "anonymous": {},
    "bad token": {"authorization": "Bearer vr_not-a-token"},
}

Outcome = int | str  # an HTTP status, or "listed" / "hidden" for the listing
Action = Callable[[Service, str, str], Awaitable[Outcome]]


def val_name(privacy: str) -> str:
    return f"v_{privacy}"


async def api(service: Service, caller: str, method: str, path: str, **kwargs: object) -> int:
    user = {"owner": "alice", "other": "bob"}.get(caller)
    response: httpx.Response = await service.api(
        method,
        path,
        user=user,
        headers=TOKEN_HEADERS[caller],
        **kwargs,
    )
    assert response.headers["content-type"] == "application/json", response.text
    if response.status_code >= 400:
        assert response.json()["error"]["type"], response.text
    return response.status_code


async def run(service: Service, caller: str, name: str) -> Outcome:
    return await api(service, caller, "GET", f"/v1/run/alice.{name}?args=[]")


async def web(service: Service, caller: str, name: str) -> Outcome:
    response = await service.web("alice", name, headers=TOKEN_HEADERS[caller])
    return response.status_code


async def read_code(service: Service, caller: str, name: str) -> Outcome:
    return await api(service, caller, "GET", f"/v1/vals/alice/{name}")


async def versions(service: Service, caller: str, name: str) -> Outcome:
    return await api(service, caller, "GET", f"/v1/vals/alice/{name}/versions")


async def listed(service: Service, caller: str, name: str) -> Outcome:
    user = {"owner": "alice", "other": "bob"}.get(caller)
    response = await service.api("GET", "/v1/vals/alice", user=user, headers=TOKEN_HEADERS[caller])
    if response.status_code != 200:
        return response.status_code
    return "listed" if name in [v["name"] for v in response.json()["vals"]] else "hidden"


async def write(service: Service, caller: str, name: str) -> Outcome:
    code = f"def {name}(*args):\n    return 'new'"
    return await api(service, caller, "PUT", f"/v1/vals/alice/{name}", json={"code": code})


async def set_privacy(service: Service, caller: str, name: str) -> Outcome:
    body = {"privacy": "public"}
    return await api(service, caller, "PATCH", f"/v1/vals/alice/{name}", json=body)


async def delete(service: Service, caller: str, name: str) -> Outcome:
    return await api(service, caller, "DELETE", f"/v1/vals/alice/{name}")


async def read_records(service: Service, caller: str, name: str) -> Outcome:
    return await api(service, caller, "GET", f"/v1/vals/alice/{name}/runs")


LISTED, HIDDEN = "listed", "hidden"

# Per action and privacy: the outcome for the val's owner, another user, and no token.
# fmt: off
MATRIX: list[tuple[Action, tuple[Outcome, ...], tuple[Outcome, ...], tuple[Outcome, ...]]] = [
    # action      public                    unlisted                  private
    (run,          (200, 200, 200),          (200, 200, 200),          (200, 404, 404)),
    (web,          (200, 200, 200),          (200, 200, 200),          (200, 200, 200)),
    (read_code,    (200, 200, 200),          (200, 200, 200),          (200, 404, 404)),
    (listed,       (LISTED, LISTED, LISTED), (LISTED, HIDDEN, HIDDEN), (LISTED, HIDDEN, HIDDEN)),
    (write,        (200, 403, 401),          (200, 403, 401),          (200, 403, 401)),
    (read_records, (200, 403, 401),          (200, 403, 401),          (200, 404, 401)),
]
# fmt: on
CELLS = [
    pytest.param(action, privacy, caller, outcome, id=f"{action.__name__}-{privacy}-{caller}")
    for action, *per_privacy in MATRIX
    for privacy, row in zip(PRIVACIES, per_privacy, strict=True)
    for caller, outcome in zip(("owner", "other", "anonymous"), row, strict=True)
]


@pytest.mark.parametrize(("action", "privacy", "caller", "expected"), CELLS)
async def test_authorization_matrix(
    service: Service, action: Action, privacy: str, caller: str, expected: Outcome
) -> None:
    name = val_name(privacy)
    await service.put_val(name, f"def {name}(*args):\n    return 'ok'", privacy=privacy)
    with trio.fail_after(15):
        assert await action(service, caller, name) == expected


@pytest.mark.parametrize(
    "action", [run, read_code, versions, listed, write, set_privacy, delete, read_records]
)
async def test_a_bad_token_is_401_on_every_api_action(service: Service, action: Action) -> None:
    # Even where no token is needed: a client that sends one should learn that it is bad.
    await service.put_val("v_public", "def v_public(*args):\n    return 'ok'")
    assert await action(service, "bad token", "v_public") == 401


async def test_a_private_val_looks_exactly_like_a_missing_one_to_others(service: Service) -> None:
    await service.put_val("secret", "def secret(*args):\n    return 1", privacy="private")
    for path in ("/v1/run/alice.{}", "/v1/vals/alice/{}", "/v1/vals/alice/{}/versions"):
        private = await service.api("GET", path.format("secret"), user="bob")
        missing = await service.api("GET", path.format("nosuch"), user="bob")
        assert private.status_code == missing.status_code == 404
        assert private.json()["error"]["type"] == missing.json()["error"]["type"]
    records = await service.api("GET", "/v1/vals/alice/secret/runs", user="bob")
    no_records = await service.api("GET", "/v1/vals/alice/nosuch/runs", user="bob")
    assert records.status_code == no_records.status_code == 404
