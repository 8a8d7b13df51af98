"""The CLI as a user runs it, where no server is needed: its config check and the mistakes it
refuses before (or instead of) calling the API. With a server: test_api.py, test_tokens.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from tests.helpers import python


async def cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    config = tmp_path / "valrun.toml"
    config.write_text(
        f'[server]\nbind = ["0.0.0.0:8123"]\n[store]\nurl = "sqlite:///{tmp_path}/v.db"\n'
    )
    with trio.fail_after(30):
        done = await trio.run_process(
            [*python(), "-m", "runtime.cli", "--config", str(config), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_config_check_prints_the_whole_config_with_defaults(tmp_path: Path) -> None:
    code, out, err = await cli(tmp_path, "config", "check")
    assert code == 0, err
    config = json.loads(out)
    assert config["server"]["bind"] == ["0.0.0.0:8123"]
    assert config["limits"]["wall_time_s"] > 0  # a default, filled in


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        pytest.param(
            ("val", "--token", "t", "get", "alice"), "expected USER/VAL", id="val_no_slash"
        ),
        pytest.param(("run", "--token", "t", "alice"), "expected USER.VAL", id="run_no_dot"),
        pytest.param(
            ("val", "--token", "t", "--server", "DOWN", "list", "alice"),
            "cannot reach",
            id="val_list_server_down",
        ),
        pytest.param(
            ("logs", "--token", "t", "--server", "DOWN"), "cannot reach", id="logs_server_down"
        ),
    ],
)
async def test_cli_mistakes_exit_1_saying_what_was_wrong(
    tmp_path: Path, args: tuple[str, ...], complaint: str
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound and never listening: connections are refused
        down = f"http://127.0.0.1:{held.getsockname()[1]}"
        code, out, err = await cli(tmp_path, *(down if arg == "DOWN" else arg for arg in args))
    assert code == 1
    assert out == ""
    assert err.startswith("valrun: ")
    assert complaint in err
    assert "Traceback" not in err
