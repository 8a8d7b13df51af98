"""`valrun serve --demo` (what scripts/serve runs): the demo user and vals, a real process that
serves them, and a clean stop on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import httpx
import trio

from runtime.demo import DEMO_USER, DEMO_VALS, seed_demo
from runtime.store import Store
from tests.helpers import python

SERVING = re.compile(rb"valrun is serving on http://127\.0\.0\.1:(\d+)")


def test_seeding_twice_keeps_the_vals_and_the_token(tmp_path: Path) -> None:
    store = Store(tmp_path / "demo.db")
    try:
        first = seed_demo(store)
        store.put_val(DEMO_USER, "hello", "def hello(req):\n    return 'changed'\n", "public")
        second = seed_demo(store)  # the user exists now: the same token, vals left as they are
        assert first == second
        user = store.user_for_token(first)
        assert user is not None
        assert user.name == DEMO_USER
        assert len(store.tokens(DEMO_USER)) == 1
        for name in DEMO_VALS:
            assert store.get_val(DEMO_USER, name, None) is not None
        hello = store.get_val(DEMO_USER, "hello", None)
        assert hello is not None
        assert hello.version == 2  # not overwritten by the second seeding
    finally:
        store.close()


async def read_until(stream: trio.abc.ReceiveStream, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
    seen = b""
    while (found := pattern.search(seen)) is None:
        chunk = await stream.receive_some()
        assert chunk, f"the process closed its output before {pattern.pattern!r}: {seen!r}"
        seen += chunk
    return found


async def test_serve_demo_answers_the_demo_vals_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "valrun.db"
    config = tmp_path / "valrun.toml"
    config.write_text(f'[server]\nbind = ["127.0.0.1:0"]\n[store]\nurl = "sqlite:///{db_path}"\n')
    process = await trio.lowlevel.open_process(
        [*python(), "-m", "runtime.cli", "--config", str(config), "serve", "--demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        with trio.fail_after(30):
            port = int((await read_until(process.stderr, SERVING)).group(1))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                hello = await client.get(
                    "/?name=you", headers={"host": f"demo-hello.web.localhost:{port}"}
                )
                added = await client.get(
                    "/v1/run/demo.add?args=%5B1,2%5D", headers={"host": f"api.localhost:{port}"}
                )
            assert hello.status_code == 200, hello.text
            assert hello.json() == {"greeting": "hi you"}
            assert added.json() == 3
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            printed = b""
            while chunk := await process.stdout.receive_some():
                printed += chunk
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()
    token = re.search(rb"demo token \(for the API at [^)]*\): (\S+)", printed)
    assert token is not None, printed
    store = Store(db_path)
    try:
        user = store.user_for_token(token.group(1).decode())
        assert user is not None
        assert user.name == DEMO_USER
    finally:
        store.close()
