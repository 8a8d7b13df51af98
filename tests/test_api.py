"""The management API (docs/contract.md §4.4) and the CLI around it, through the real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from runtime.client import ApiClient
from runtime.config import Config
from tests.helpers import HELLO, Service, StartService, assert_json_error, python, valrun


async def test_me_names_the_tokens_user(service: Service) -> None:
    response = await service.api("GET", "/v1/me", user="bob")
    assert response.json()["username"] == "bob"


@pytest.mark.parametrize("authorization", [None, "Bearer nope", "Basic abc", "Bearer", "bearer  x"])
async def test_missing_or_bad_token_is_401(service: Service, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    response = await service.api("GET", "/v1/me", user=None, headers=headers)
    assert_json_error(response, 401, "unauthorized")


async def test_only_the_owner_writes_a_val(service: Service) -> None:
    await service.put_val("hello", HELLO)
    for method, kwargs in (
        ("PUT", {"content": b"def hello(req):\n    return 'pwned'"}),
        ("PATCH", {"json": {"privacy": "private"}}),
        ("DELETE", {}),
    ):
        response = await service.api(method, "/v1/vals/alice/hello", user="bob", **kwargs)
        assert_json_error(response, 403, "forbidden")
    current = await service.api("GET", "/v1/vals/alice/hello", user="bob")
    assert (current.json()["version"], current.json()["privacy"]) == (1, "public")


async def test_versions_are_immutable_and_listed_oldest_first(service: Service) -> None:
    for n in (1, 2, 3):
        saved = await service.put_val("hello", HELLO + f"\n# v{n}\n")
        assert saved.json()["version"] == n
    versions = (await service.api("GET", "/v1/vals/alice/hello/versions")).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    pinned = (await service.api("GET", "/v1/vals/alice/hello?v=2")).json()
    assert pinned["version"] == 2
    assert pinned["code"].endswith("# v2\n")
    latest = (await service.api("GET", "/v1/vals/alice/hello")).json()
    assert latest["version"] == 3
    assert_json_error(await service.api("GET", "/v1/vals/alice/hello?v=9"), 404, "not_found")
    assert_json_error(await service.api("GET", "/v1/vals/alice/hello?v=x"), 400, "bad_version")


async def test_source_as_plain_text_or_json(service: Service) -> None:
    text = await service.api("PUT", "/v1/vals/alice/hello", content=HELLO.encode())
    assert text.status_code == 201
    as_json = await service.api(
        "PUT", "/v1/vals/alice/hello", json={"code": HELLO, "privacy": "unlisted"}
    )
    assert (as_json.status_code, as_json.json()["privacy"]) == (200, "unlisted")


async def test_listing_shows_others_only_public_vals(service: Service) -> None:
    await service.put_val("pub", "def pub(req):\n    return 1", privacy="public")
    await service.put_val("unl", "def unl(req):\n    return 1", privacy="unlisted")
    await service.put_val("prv", "def prv(req):\n    return 1", privacy="private")
    own = (await service.api("GET", "/v1/vals/alice")).json()["vals"]
    assert [v["name"] for v in own] == ["prv", "pub", "unl"]
    for viewer in ("bob", None):
        seen = (await service.api("GET", "/v1/vals/alice", user=viewer)).json()["vals"]
        assert [v["name"] for v in seen] == ["pub"]
    assert_json_error(await service.api("GET", "/v1/vals/nobody"), 404, "not_found")


async def test_private_code_is_hidden_as_not_found(service: Service) -> None:
    await service.put_val("prv", "def prv(req):\n    return 1", privacy="private")
    assert (await service.api("GET", "/v1/vals/alice/prv")).status_code == 200
    for viewer in ("bob", None):
        response = await service.api("GET", "/v1/vals/alice/prv", user=viewer)
        assert_json_error(response, 404, "not_found")


async def test_patch_changes_privacy(service: Service) -> None:
    await service.put_val("hello", HELLO)
    patched = await service.api("PATCH", "/v1/vals/alice/hello", json={"privacy": "private"})
    assert patched.json()["privacy"] == "private"
    bad = await service.api("PATCH", "/v1/vals/alice/hello", json={"privacy": "secret"})
    assert_json_error(bad, 400, "bad_privacy")


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "error_type"),
    [
        ("PUT", "/v1/vals/alice/9lives", {"content": b"x"}, 400, "bad_name"),
        ("PUT", "/v1/vals/alice/has-hyphen", {"content": b"x"}, 400, "bad_name"),
        ("PUT", "/v1/vals/Alice/hello", {"content": b"x"}, 400, "bad_name"),
        (
            "PUT",
            "/v1/vals/alice/hello",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        ("PUT", "/v1/vals/alice/hello", {"json": {"code": 5}}, 400, "bad_request"),
        (
            "PUT",
            "/v1/vals/alice/hello",
            {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        (
            "PUT",
            "/v1/vals/alice/hello",
            {"content": b'{"code": NaN}', "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        ("PUT", "/v1/vals/alice/hello", {"json": {"code": "x", "extra": 1}}, 400, "bad_request"),
        ("PUT", "/v1/vals/alice/hello", {"content": b"   "}, 400, "bad_request"),
        ("PUT", "/v1/vals/alice/hello", {"content": b"\xff\xfe"}, 400, "bad_request"),
        ("PUT", "/v1/env/1BAD", {"content": b"v"}, 400, "bad_name"),
        ("POST", "/v1/vals/alice/hello", {}, 405, "method_not_allowed"),
        ("GET", "/v1/nothing", {}, 404, "not_found"),
        ("DELETE", "/v1/vals/alice/nosuch", {}, 404, "not_found"),
        ("PATCH", "/v1/vals/alice/nosuch", {"json": {"privacy": "private"}}, 404, "not_found"),
        ("DELETE", "/v1/env/NOSUCH", {}, 404, "not_found"),
    ],
)
async def test_bad_api_input_gets_a_clear_json_error(
    service: Service,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    error_type: str,
) -> None:
    response = await service.api(method, path, **kwargs)  # type: ignore[arg-type]
    assert_json_error(response, status, error_type)


async def test_method_not_allowed_names_the_allowed_methods(service: Service) -> None:
    response = await service.api("POST", "/v1/env")
    assert response.headers["allow"] == "GET, HEAD"


async def test_source_over_the_limit_is_413(service: Service) -> None:
    big = b"#" * (service.config.limits.max_source_bytes + 1)
    assert_json_error(
        await service.api("PUT", "/v1/vals/alice/big", content=big), 413, "request_too_large"
    )


async def test_healthz_reports_isolation_layers(service: Service) -> None:
    health = (await service.api("GET", "/healthz", user=None)).json()
    assert health["status"] == "ok"
    layers = health["isolation"]
    for layer in ("restricted_python", "seccomp", "landlock", "namespaces", "drop_user"):
        assert layers[layer]["active"] is True, layers[layer]
        assert layers[layer]["detail"]


async def test_metrics_count_requests_cold_starts_and_kills(start_service: StartService) -> None:
    service = await start_service(wall_time_s=0.5)
    await service.put_val("hello", HELLO)
    await service.put_val("hang", "import time\ndef hang(req):\n    time.sleep(5)")
    with trio.fail_after(20):
        for _ in range(3):
            assert (await service.web("alice", "hello")).status_code == 200
        assert (await service.web("alice", "hang")).status_code == 504
        response = await service.api("GET", "/metrics", user=None)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = dict(
        line.rsplit(" ", 1) for line in response.text.splitlines() if not line.startswith("#")
    )
    assert samples['valrun_requests_total{kind="web",status="200"}'] == "3"
    assert samples['valrun_requests_total{kind="web",status="504"}'] == "1"
    assert samples['valrun_invocations_total{start="cold"}'] == "2"
    assert samples['valrun_invocations_total{start="warm"}'] == "2"
    assert samples['valrun_worker_kills_total{reason="timeout"}'] == "1"
    assert samples['valrun_request_duration_seconds_count{kind="web"}'] == "4"


# The CLI, as a user runs it: a real process against the real server.


async def test_cli_user_create_prints_a_working_token_last(service: Service) -> None:
    done = await valrun(service, "user", "create", "carol")
    assert done.returncode == 0, done.stderr
    token = done.stdout.decode().splitlines()[-1]
    me = await service.api("GET", "/v1/me", user=None, headers={"authorization": f"Bearer {token}"})
    assert me.json()["username"] == "carol"
    again = await valrun(service, "user", "create", "carol")
    assert again.returncode == 2
    assert b"already exists" in again.stderr


async def test_cli_val_put_get_list_delete(service: Service, tmp_path: Path) -> None:
    source = tmp_path / "hello.py"
    source.write_text(HELLO)
    token = ("--token", service.tokens["alice"])
    put = await valrun(service, "val", *token, "put", "alice/hello", str(source))
    assert put.returncode == 0, put.stderr
    got = await valrun(service, "val", *token, "get", "alice/hello")
    assert got.stdout.decode() == HELLO
    listed = await valrun(service, "val", *token, "list", "alice")
    header, row = listed.stdout.decode().splitlines()
    assert header.split() == ["NAME", "VERSION", "PRIVACY", "URL"]
    assert row.split()[:3] == ["hello", "v1", "public"]
    deleted = await valrun(service, "val", *token, "delete", "alice/hello")
    assert deleted.returncode == 0
    gone = await valrun(service, "val", *token, "get", "alice/hello")
    assert gone.returncode != 0
    assert b"404" in gone.stderr


async def test_config_check_refuses_unknown_keys(tmp_path: Path) -> None:
    config = tmp_path / "valrun.toml"
    config.write_text("[limits]\nwal_time_s = 5\n")
    done = await trio.run_process(
        [*python(), "-m", "runtime.cli", "--config", str(config), "config", "check"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 2
    assert b"limits.wal_time_s" in done.stderr


# Env (docs/contract.md §9.2): a change reaches the very next invocation.

SHOW_COLOR = "def {name}(req=None):\n    return env.get('COLOR', 'none')"


async def workers(service: Service) -> int:
    """Warm (specialized) workers: idle or busy, not the generic ones waiting ready."""
    gauges = (await service.api("GET", "/healthz", user=None)).json()["workers"]
    return int(gauges["idle"]) + int(gauges["busy"])


async def test_a_changed_env_reaches_the_next_invocation_and_retires_warm_workers(
    service: Service,
) -> None:
    await service.api("PUT", "/v1/env/COLOR", content=b"red")
    await service.put_val("color", SHOW_COLOR.format(name="color"))
    await service.put_val("bobs", SHOW_COLOR.format(name="bobs"), user="bob")
    with trio.fail_after(20):
        assert (await service.web("alice", "color")).text == "red"
        assert (await service.web("bob", "bobs")).text == "none"
        assert await workers(service) == 2
        await service.api("PUT", "/v1/env/COLOR", content=b"blue")
        assert await workers(service) == 1  # alice's warm worker went at once; bob's stays
        assert (await service.web("alice", "color")).text == "blue"
        assert (await service.api("GET", "/v1/run/alice.color")).json() == "blue"
        await service.api("DELETE", "/v1/env/COLOR")
        assert (await service.api("GET", "/v1/run/alice.color")).json() == "none"
        assert (await service.web("bob", "bobs")).text == "none"


async def test_env_values_never_appear_in_listings_or_errors(service: Service) -> None:
    await service.api("PUT", "/v1/env/TOKEN", content=b"tok-123456")
    await service.put_val("fail", "def fail(req=None):\n    raise KeyError(env['TOKEN'])")
    with trio.fail_after(15):
        failed = await service.api("GET", "/v1/run/alice.fail")
    listing = await service.api("GET", "/v1/env")
    val = await service.api("GET", "/v1/vals/alice/fail")
    for response in (failed, listing, val):
        assert "tok-123456" not in response.text
    assert "[env TOKEN]" in failed.json()["error"]["message"]


async def test_cli_env_set_list_unset(service: Service) -> None:
    token = ("--token", service.tokens["alice"])
    from_stdin = await valrun(service, "env", "set", *token, "API_KEY", stdin=b"s3cret\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    given = await valrun(service, "env", "set", *token, "OTHER", "value")
    assert given.returncode == 0, given.stderr
    await service.put_val("key", "def key(req=None):\n    return env['API_KEY']")
    with trio.fail_after(15):
        assert (await service.api("GET", "/v1/run/alice.key")).json() == "s3cret"
    listed = await valrun(service, "env", "list", *token)
    assert listed.stdout.decode().splitlines() == ["API_KEY", "OTHER"]
    assert b"s3cret" not in listed.stdout
    unset = await valrun(service, "env", "unset", *token, "OTHER")
    assert unset.returncode == 0, unset.stderr
    assert (await valrun(service, "env", "list", *token)).stdout == b"API_KEY\n"


def test_cli_client_names_the_local_api_host_only_when_it_connects_to_the_bind_address() -> None:
    config = Config()
    assert ApiClient(config, None, None).host_header == "api.localhost:8080"
    assert ApiClient(config, "https://api.example.com", None).host_header is None
