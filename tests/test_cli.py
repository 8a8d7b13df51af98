"""The `valrun` command as its users run it: a real process, against the real server, with
the config found as it would be on their machine."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from runtime.client import api_target
from runtime.config import Config, ServerConfig
from runtime.demo import DEMO_USER
from runtime.store import Store
from tests.helpers import Service, cli, write_config

HELLO = "def hello(req):\n    return 'hi v{}'\n"


async def test_valrun_toml_in_the_current_directory_is_found_without_config(
    service: Service, tmp_path: Path
) -> None:
    write_config(tmp_path / "here", service)
    listed = await cli("val", "list", "alice", cwd=tmp_path / "here")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.decode().split() == ["NAME", "VERSION", "PRIVACY", "URL"]


async def test_valrun_config_env_names_the_config_from_anywhere(
    service: Service, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "etc", service)
    (tmp_path / "elsewhere").mkdir()
    created = await cli(
        "user", "create", "carol", cwd=tmp_path / "elsewhere", env={"VALRUN_CONFIG": str(config)}
    )
    assert created.returncode == 0, created.stderr
    me = await service.api(
        "GET",
        "/v1/me",
        user=None,
        headers={"authorization": f"Bearer {created.stdout.decode().splitlines()[-1]}"},
    )
    assert me.json()["username"] == "carol"


async def test_a_relative_database_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "valrun.toml").write_text('[store]\nurl = "sqlite:///data/valrun.db"\n')
    (folder / "data").mkdir()
    (tmp_path / "other").mkdir()
    checked = await cli(
        "config", "check", "--config", str(folder / "valrun.toml"), cwd=tmp_path / "other"
    )
    assert checked.returncode == 0, checked.stderr
    database = str((folder / "data" / "valrun.db").resolve())
    effective = json.loads(checked.stdout)
    assert effective["config_file"] == str((folder / "valrun.toml").resolve())
    assert effective["database"] == database
    assert effective["store"]["url"] == f"sqlite:///{database}"
    created = await cli(
        "--config", str(folder / "valrun.toml"), "user", "create", "dave", cwd=tmp_path / "other"
    )
    assert created.returncode == 0, created.stderr
    assert Path(database).is_file()
    assert not (tmp_path / "other" / "data").exists()


async def test_options_work_before_and_after_the_verb(service: Service, tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "conf", service))
    source = tmp_path / "hello.py"
    source.write_text(HELLO.format(1))
    token = service.tokens["alice"]
    after = await cli(
        "val", "put", "--config", config, "--token", token, "alice/hello", str(source), cwd=tmp_path
    )
    assert after.returncode == 0, after.stderr
    before = await cli(
        "--config",
        config,
        "--token",
        token,
        "val",
        "versions",
        "alice/hello",
        "--json",
        cwd=tmp_path,
    )
    assert before.returncode == 0, before.stderr
    assert [v["version"] for v in json.loads(before.stdout)] == [1]
    split = await cli(
        "--config", config, "val", "get", "--token", token, "alice/hello", cwd=tmp_path
    )
    assert split.stdout.decode() == HELLO.format(1)


async def test_server_url_on_any_port_is_reached_with_the_api_host_named(
    service: Service, tmp_path: Path
) -> None:
    # No config at all: the defaults say 127.0.0.1:8080; --server says where the service is.
    await service.put_val("hello", HELLO.format(1))
    for server in (f"http://127.0.0.1:{service.port}", f"http://localhost:{service.port}/"):
        got = await cli("val", "get", "alice/hello", "--server", server, cwd=tmp_path)
        assert (got.returncode, got.stdout.decode()) == (0, HELLO.format(1)), got.stderr
    from_env = await cli(
        "val",
        "get",
        "alice/hello",
        cwd=tmp_path,
        env={"VALRUN_SERVER": f"http://127.0.0.1:{service.port}"},
    )
    assert from_env.stdout.decode() == HELLO.format(1), from_env.stderr


@pytest.mark.parametrize(
    ("server", "base", "host"),
    [
        (None, "http://127.0.0.1:8080", "api.example.com:8080"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000", "api.example.com:9000"),
        ("http://[::1]:9000/", "http://[::1]:9000", "api.example.com:9000"),
        ("http://10.1.2.3", "http://10.1.2.3", "api.example.com"),
        ("http://devbox:8080", "http://devbox:8080", "api.example.com:8080"),
        ("http://api.example.com:8080", "http://api.example.com:8080", None),
        ("https://api.example.com", "https://api.example.com", None),
        ("https://vals.internal:8443", "https://vals.internal:8443", None),
    ],
)
def test_api_target_connects_to_the_url_and_names_the_api_host_unless_tls_names_it(
    server: str | None, base: str, host: str | None
) -> None:
    config = Config(server=ServerConfig(api_host="api.example.com", web_domain="vals.example"))
    assert api_target(config, server) == (base, host)


def test_a_server_that_is_no_url_is_refused() -> None:
    with pytest.raises(SystemExit, match="http"):
        api_target(Config(), "127.0.0.1:8080")


@pytest.mark.parametrize(
    "args",
    [
        ("val", "put", "alice/hello", "hello.py"),
        ("val", "rm", "alice/hello"),
        ("env", "list"),
        ("logs", "alice/hello"),
    ],
)
async def test_without_a_token_the_cli_says_to_set_valrun_token(
    service: Service, tmp_path: Path, args: tuple[str, ...]
) -> None:
    write_config(tmp_path, service)
    (tmp_path / "hello.py").write_text(HELLO.format(1))
    done = await cli(*args, cwd=tmp_path)
    assert done.returncode != 0
    assert b"set VALRUN_TOKEN" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_a_401_without_a_token_also_says_to_set_valrun_token(
    service: Service, tmp_path: Path
) -> None:
    write_config(tmp_path, service)
    done = await cli("eval", "1 + 1", cwd=tmp_path)
    assert done.returncode != 0
    assert b"401 unauthorized" in done.stderr
    assert b"set VALRUN_TOKEN" in done.stderr


async def test_val_versions_rollback_privacy_and_rm(service: Service, tmp_path: Path) -> None:
    write_config(tmp_path, service)
    env = {"VALRUN_TOKEN": service.tokens["alice"]}
    for version in (1, 2):
        (tmp_path / "hello.py").write_text(HELLO.format(version))
        put = await cli("val", "put", "alice/hello", "hello.py", cwd=tmp_path, env=env)
        assert put.returncode == 0, put.stderr
    with trio.fail_after(15):
        assert (await service.web("alice", "hello")).text == "hi v2"

    rolled = await cli("val", "rollback", "alice/hello", "1", cwd=tmp_path, env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert b"v3 now runs the code of v1" in rolled.stdout
    with trio.fail_after(15):
        assert (await service.web("alice", "hello")).text == "hi v1"
    versions = await cli("val", "versions", "alice/hello", cwd=tmp_path, env=env)
    rows = versions.stdout.decode().splitlines()
    assert rows[0].split() == ["VERSION", "CREATED"]
    assert [row.split()[0] for row in rows[1:]] == ["v1", "v2", "v3"]

    private = await cli("val", "privacy", "alice/hello", "private", cwd=tmp_path, env=env)
    assert private.returncode == 0, private.stderr
    assert (await service.api("GET", "/v1/vals/alice/hello", user="bob")).status_code == 404
    listed = await cli("val", "list", "alice", "--json", cwd=tmp_path, env=env)
    assert [(v["name"], v["version"], v["privacy"]) for v in json.loads(listed.stdout)] == [
        ("hello", 3, "private")
    ]

    removed = await cli("val", "rm", "alice/hello", cwd=tmp_path, env=env)
    assert removed.returncode == 0, removed.stderr
    assert (await service.api("GET", "/v1/vals/alice/hello")).status_code == 404
    again = await cli("val", "rm", "alice/hello", cwd=tmp_path, env=env)
    assert again.returncode != 0
    assert b"404 not_found" in again.stderr


async def start_demo(folder: Path) -> str:
    """`valrun serve --demo` in `folder` until it prints the demo token; then stop it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VALRUN_")}
    environ["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    command = [sys.executable, "-m", "runtime.cli", "serve", "--demo", "--bind", "127.0.0.1:0"]
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            command, cwd=folder, env=environ, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert process.stdout is not None
        output = b""
        try:
            while b"demo token" not in output or not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, f"serve --demo exited: {output!r}"
                output += chunk
        finally:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    line = next(line for line in output.decode().splitlines() if "demo token" in line)
    return line.rpartition(" ")[2]


async def test_serve_demo_reuses_the_demo_token_and_keeps_files_private(tmp_path: Path) -> None:
    first = await start_demo(tmp_path)
    second = await start_demo(tmp_path)
    assert first == second
    assert first.startswith("vr_")
    db = tmp_path / "valrun.db"
    for path in (db, tmp_path / "valrun.db.demo-token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    store = Store(db)
    try:
        assert len(store.tokens(DEMO_USER)) == 1
        (token_id,) = [info.id for info in store.tokens(DEMO_USER)]
        store.revoke_token(token_id)  # a revoked token is replaced, not reused
    finally:
        store.close()
    third = await start_demo(tmp_path)
    assert third != first
