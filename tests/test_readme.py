"""Every example in the README runs, so none can drift from what valrun does.

- `sh` blocks run with bash against a valrun started by `./scripts/serve --demo`, in a
  scratch folder holding the folder's `valrun.toml` (the CLI finds it there) and a link to
  `.venv`; `8080` becomes the real port, `curl` fails on an HTTP error.
- `python` blocks are vals, saved as the demo user's and called on their host; Python that
  defines no handler (`def name(req)`) is evaluated through the Eval API instead.
- `json` blocks must parse as JSON.
- `toml` blocks are parsed as valrun.toml.
- `nginx` and `caddyfile` blocks run: the real proxy with the README's files (ports and
  certificate paths changed, a self-signed certificate), in front of valrun configured by the
  README's proxy `toml` block; the block marked "run through each proxy" runs through each.
- A block marked `<!-- run with the service stopped -->` runs after the service stopped.
- A block marked `<!-- not run: why -->` is not run; blocks without a language are diagrams.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import trio

from runtime.config import StoreConfig, parse_config
from runtime.demo import seed_demo
from runtime.server import serve_valrun
from runtime.store import Store
from sandbox.policy import LogBuffer, make_globals
from tests.helpers import AccessLines, capture_access_lines
from tests.proxy_kit import Block, Certificate, certificate, doc_blocks, run_caddy, run_nginx

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN_LANGUAGES = {"sh", "python", "toml", "json", "nginx", "caddyfile"}
STOPPED = "<!-- run with the service stopped -->"
THROUGH_PROXY = "<!-- run through each proxy -->"


BLOCKS = doc_blocks(README)


def of(language: str, mark: str = "") -> list[Block]:
    return [b for b in BLOCKS if b.language == language and b.mark == mark]


def test_every_readme_block_is_run_or_says_why_not() -> None:
    for block in BLOCKS:
        where = f"README.md:{block.line}"
        if block.mark.startswith("<!-- not run:"):
            assert len(block.mark) > len("<!-- not run:  -->") + 10, f"{where}: say why"
        elif block.language:
            assert block.language in RUN_LANGUAGES, f"{where}: no test runs {block.language!r}"
            assert block.mark in ("", STOPPED, THROUGH_PROXY), f"{where}: unknown {block.mark}"
    # The README's first screen stays two commands.
    first = BLOCKS[0]
    assert first.text.count("\n") == 2
    assert first.text.startswith("./scripts/serve")


@pytest.mark.parametrize("block", of("toml"), ids=lambda b: f"line{b.line}")
def test_readme_config_blocks_are_valid_config(block: Block) -> None:
    parse_config(tomllib.loads(block.text))


def test_readme_json_blocks_are_json() -> None:
    for block in of("json"):
        json.loads(block.text)


# The service as the README starts it


@dataclass
class Running:
    port: int
    token: str
    work: Path  # the scratch folder the examples run in


def localize(text: str, port: int, token: str) -> str:
    """The example as run here: the real port, the token the service printed (`vr_...`)."""
    text = text.replace("8080", str(port)).replace("vr_...", token)
    # An HTTP error status fails the example, as a non-zero exit does.
    return re.sub(r"\bcurl (?!.*(?:-fsS|--fail))", "curl --fail-with-body -sS ", text)


async def run_sh(block: Block, work: Path, env: dict[str, str], port: int) -> None:
    script = "set -euo pipefail\n" + localize(block.text, port, env["VALRUN_TOKEN"])
    with trio.fail_after(60):
        done = await trio.run_process(
            ["bash", "-c", script],
            cwd=work,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, (
        f"README.md:{block.line} failed ({done.returncode}):\n{script}\n"
        f"stdout: {done.stdout.decode()}\nstderr: {done.stderr.decode()}"
    )


def example_env(token: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VALRUN_")}
    return {**environ, "VALRUN_TOKEN": token}


def scratch_env(token: str, work: Path) -> dict[str, str]:
    """The examples' environment: `mktemp` makes its folders in the scratch folder."""
    (work / "tmp").mkdir(exist_ok=True)
    return {**example_env(token), "TMPDIR": str(work / "tmp")}


@asynccontextmanager
async def readme_service(tmp_path: Path) -> AsyncIterator[tuple[Running, trio.Process]]:
    """`./scripts/serve --config ... --bind 127.0.0.1:0`, as a process; its output drained."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    config = work / "valrun.toml"
    config.write_text('[store]\nurl = "sqlite:///valrun.db"\n')
    command = [str(ROOT / "scripts" / "serve"), "--config", str(config), "--bind", "127.0.0.1:0"]
    process = await trio.lowlevel.open_process(
        command,
        env=example_env(""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = process.stdout, process.stderr
    output = {"out": b"", "err": b""}
    started = trio.Event()

    async def drain(name: str, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some():
            output[name] += chunk
            if re.search(rb"valrun is serving on http://127\.0\.0\.1:\d+", output["err"]):
                started.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, "out", stdout)
            nursery.start_soon(drain, "err", stderr)
            with trio.fail_after(60):
                await started.wait()
            found = re.search(rb"serving on http://127\.0\.0\.1:(\d+)", output["err"])
            token = re.search(rb"demo token .*: (vr_\S+)", output["out"])
            assert found, output
            assert token, output
            port = int(found.group(1))
            # The CLI in the scratch folder finds this config and, in it, the service.
            config.write_text(
                f'[server]\nbind = ["127.0.0.1:{port}"]\n[store]\nurl = "sqlite:///valrun.db"\n'
            )
            yield Running(port, token.group(1).decode(), work), process
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()


async def test_readme_examples_run_against_a_real_server(tmp_path: Path) -> None:
    async with readme_service(tmp_path) as (running, process):
        env = scratch_env(running.token, running.work)
        for block in of("sh"):
            await run_sh(block, running.work, env, running.port)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{running.port}", timeout=30
        ) as client:
            for block in of("python"):
                await check_val_block(client, block, running)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        for block in of("sh", STOPPED):
            await run_sh(block, running.work, env, running.port)


async def check_val_block(client: httpx.AsyncClient, block: Block, running: Running) -> None:
    """A handler (`def name(req)`) is saved as demo/name and called on its host; any other
    Python is evaluated through the Eval API. Either must answer 200."""
    api = {"host": "api.localhost", "authorization": f"Bearer {running.token}"}
    export = re.search(r"^def (\w+)\(req", block.text, re.MULTILINE)
    with trio.fail_after(30):
        if export is None:
            answer = await client.post("/v1/eval", json={"code": block.text}, headers=api)
        else:
            name = export.group(1)
            saved = await client.put(
                f"/v1/vals/demo/{name}", content=block.text.encode(), headers=api
            )
            assert saved.status_code in (200, 201), f"README.md:{block.line}: {saved.text}"
            answer = await client.get(
                "/?name=readme", headers={"host": f"demo-{name.lower()}.web.localhost"}
            )
    assert answer.status_code == 200, f"README.md:{block.line}: {answer.text}"


# The proxy section, through real nginx and Caddy


def nginx_site(folder: Path, upstream: int) -> str:
    """The README's nginx server blocks, with the file they include written beside them."""
    sites, proxy = of("nginx")
    (folder / "valrun-proxy.conf").write_text(proxy.text.replace("8080", str(upstream)))
    return sites.text.replace("/etc/nginx/valrun-proxy.conf", str(folder / "valrun-proxy.conf"))


@asynccontextmanager
async def run_proxy(
    proxy: str, folder: Path, upstream: int, cert: Certificate
) -> AsyncIterator[int]:
    """The README's nginx or Caddy config, run for real in front of `upstream`."""
    if proxy == "nginx":
        async with run_nginx(folder, nginx_site(folder, upstream), [], cert) as port:
            yield port
    else:
        (caddyfile,) = of("caddyfile")
        sites = caddyfile.text.replace("8080", str(upstream))
        async with run_caddy(folder, sites, [], cert) as port:
            yield port


@pytest.fixture
def access_lines() -> Iterator[AccessLines]:
    with capture_access_lines() as lines:
        yield lines


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
async def test_readme_proxy_section_runs_through_nginx_and_caddy(
    proxy: str, tmp_path: Path, access_lines: AccessLines
) -> None:
    (production,) = [b for b in of("toml") if 'trusted_proxies = ["127.0.0.1"' in b.text]
    config = parse_config(tomllib.loads(production.text))
    db = tmp_path / "valrun.db"
    config = replace(
        config,
        server=replace(config.server, bind=("127.0.0.1:0",)),
        store=StoreConfig(url=f"sqlite:///{db}"),
    )
    store = Store(db)
    token = seed_demo(store)
    store.close()
    cert = await certificate(tmp_path, ("api.example.com", "*.example-vals.net"))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            urls = await nursery.start(
                lambda task_status: serve_valrun(config, task_status=task_status)
            )
        upstream = int(urls[0].rpartition(":")[2])
        async with run_proxy(proxy, tmp_path, upstream, cert) as listen:
            (block,) = of("sh", THROUGH_PROXY)
            # The URL's host and port stay as written (SNI, Host); curl connects to the
            # proxy on loopback, from 127.0.0.2 so the client differs from the proxy.
            curl = f"curl -fsS --connect-to ::127.0.0.1:{listen} --cacert {cert.ca} "
            through = block.text.replace("curl -fsS ", curl + "--interface 127.0.0.2 ")
            await run_sh(replace(block, text=through), tmp_path, example_env(token), 0)
            # The client's address (127.0.0.2), from the proxy's X-Forwarded-For.
            await access_lines.wait_for("127.0.0.2 GET demo-hello.example-vals.net /")
            await access_lines.wait_for("127.0.0.2 GET api.example.com /v1/me 200")
        nursery.cancel_scope.cancel()


def test_the_builtins_the_readme_says_are_refused_are_absent() -> None:
    (row,) = [line for line in README.read_text().splitlines() if line.startswith("| `exec`")]
    refused = re.findall(r"`(\w+)`", row.split("|")[1])
    assert len(refused) >= 10
    builtins = make_globals("v", {}, LogBuffer(1024))["__builtins__"]
    assert not set(refused) & set(builtins)
    # ... and the guarded getattr the README names refuses what the compiler refuses.
    with pytest.raises(AttributeError):
        builtins["getattr"](1, "__class__")
