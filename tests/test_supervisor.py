"""Running valrun under a supervisor: the systemd unit that ships in docs/, and a /healthz that
a load balancer can act on (503 while degraded)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from runtime.config import ServerConfig
from tests.live import PIDS_CGROUPS, pids_cgroup, start_live

UNIT = Path(__file__).parent.parent / "docs" / "valrun.service"
SHIPPED_VALRUN = "/opt/valrun/.venv/bin/valrun"


def unit_settings() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_restarts_a_failed_front_end_and_outwaits_its_shutdown() -> None:
    service = unit_settings()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split()[0] == SHIPPED_VALRUN
    assert service["KillMode"] == "mixed"  # SIGTERM to valrun; it stops its workers itself
    assert float(service["TimeoutStopSec"]) > ServerConfig().shutdown_timeout_s


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_file_is_valid_for_systemd(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's valrun.
    valrun = Path(sys.executable).parent / "valrun"
    assert valrun.exists()
    unit = tmp_path / "valrun.service"
    unit.write_text(UNIT.read_text().replace(SHIPPED_VALRUN, str(valrun)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    # It warns (and still exits 0) for unknown keys and bad values: none allowed.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


async def test_healthz_is_503_while_workers_cannot_be_started(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    if not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip("needs a writable pids cgroup (root, cgroup v1 pids controller)")
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path, "[pool]\nprewarm_workers = 1\n")
        async with httpx.AsyncClient(timeout=30, base_url=live.base_url) as client:

            async def health() -> httpx.Response:
                return await client.get("/healthz", headers=live.api_headers())

            while (await health()).json()["workers"]["ready"] < 1:  # prewarmed
                await trio.sleep(0.02)
            assert (await health()).status_code == 200
            for name in ("a", "b"):  # saved first: a save's check takes a worker too
                code = f"def {name}(req):\n    return 'v'\n"
                saved = await client.put(
                    f"/v1/vals/alice/{name}", headers=live.api_headers(), content=code
                )
                assert saved.status_code == 201, saved.text
            while (await health()).json()["workers"]["ready"] < 1:  # prewarmed again
                await trio.sleep(0.02)
            with pids_cgroup(live.fork_server_pid()) as group:
                (group / "pids.max").write_text("1")
                for name in ("a", "b"):  # the ready worker, then none
                    await client.get("/", headers=live.web_headers(name))
                degraded = await health()
                assert degraded.status_code == 503, degraded.text
                assert degraded.json()["status"] == "degraded"
                assert any("cannot be started" in p for p in degraded.json()["problems"])
                (group / "pids.max").write_text("max")
                while (await health()).status_code != 200:
                    await trio.sleep(0.05)
        live.process.terminate()
        await live.process.wait()
