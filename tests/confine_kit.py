"""The confinement tests' driver: plain Python run in a freshly confined interpreter, and its
verdict (tests/test_confine.py explains it)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sandbox

REPO = Path(sandbox.__file__).resolve().parent.parent
SECRET = "hunter2-valrun-secret"
IS_ROOT = os.geteuid() == 0

DRIVER = r"""
import ctypes, json, os, signal, socket, subprocess, sys, threading  # preloaded for attacks

from sandbox.confine import ConfinePlan, confine

spec = json.loads(sys.argv[1])
# After the uid drop nothing new can be imported when the interpreter lives under a 0700
# directory (here /root/.pyenv): like the worker, load everything first.
for name in spec["preload"]:
    __import__(name)
if os.path.isdir(spec["workdir"]):
    os.chdir(spec["workdir"])
if spec["become_nobody"]:  # a service that is not root: confine must manage without
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
if spec["threads"]:
    threading.Thread(target=threading.Event().wait, daemon=True).start()
applied = {}
if spec["layers"] is not None:
    plan = ConfinePlan(
        workdir=spec["workdir"],
        keep_fds=(0, 1, 2),
        memory_mb=256,
        cpu_time_s=20,
        file_size_mb=16,
        open_files=64,
        layers=frozenset(spec["layers"]),
    )
    applied = confine(plan)
if spec["wait"]:
    print("ready", flush=True)
    sys.stdin.read()
modules = ("ctypes", "json", "os", "signal", "socket", "subprocess", "sys", "threading")
scope = {"ctx": spec["context"], **{name: sys.modules[name] for name in modules}}
try:
    exec(spec["code"], scope)
    verdict = {"outcome": "done", "result": scope.get("result")}
except BaseException as exc:
    verdict = {"outcome": "raised", "type": type(exc).__name__,
               "errno": getattr(exc, "errno", None), "message": str(exc)}
verdict["applied"] = applied
print(json.dumps(verdict, default=repr), flush=True)
"""

_workdirs = itertools.count()


def driver_command(
    workdir: Path,
    code: str,
    layers: Iterable[str] | None,
    *,
    context: dict[str, Any] | None = None,
    become_nobody: bool = False,
    threads: bool = False,
    wait: bool = False,
    preload: tuple[str, ...] = (),
) -> list[str]:
    spec = {
        "workdir": str(workdir),
        "layers": None if layers is None else sorted(layers),
        "code": code,
        "context": context or {},
        "become_nobody": become_nobody,
        "threads": threads,
        "wait": wait,
        "preload": ["encodings.idna", *preload],  # getaddrinfo() encodes names with idna
    }
    return [sys.executable, "-I", "-c", DRIVER, json.dumps(spec)]


def new_workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / f"work-{next(_workdirs)}"
    workdir.mkdir(mode=0o700)
    return workdir


def run_driver(
    tmp_path: Path,
    code: str,
    layers: Iterable[str] | None,
    *,
    pass_fds: tuple[int, ...] = (),
    workdir: Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `code` in a fresh interpreter confined by `layers` (None: not confined)."""
    command = driver_command(workdir or new_workdir(tmp_path), code, layers, **options)
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={"VALRUN_TEST_SECRET": SECRET},  # as if the parent had been careless
        cwd=tmp_path,
        pass_fds=pass_fds,
        timeout=30,
        check=False,
    )
    lines = done.stdout.decode().strip().splitlines()
    assert lines, f"driver printed nothing (exit {done.returncode}): {done.stderr.decode()}"
    verdict: dict[str, Any] = json.loads(lines[-1])
    return verdict


def assert_refused(verdict: dict[str, Any], exc_type: str, errno_: int | None = None) -> None:
    assert verdict["outcome"] == "raised", verdict
    assert verdict["type"] == exc_type, verdict
    if errno_ is not None:
        assert verdict["errno"] == errno_, verdict


def assert_done(verdict: dict[str, Any]) -> None:
    assert verdict["outcome"] == "done", verdict


def next_tag() -> int:
    """A number no other workdir or trace of this test run has used."""
    return next(_workdirs)
