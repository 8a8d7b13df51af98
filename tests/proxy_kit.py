"""Real nginx and Caddy in front of real valrun nodes, on loopback, configured by the blocks
of a document (docs/deploy.md): what the guide tells an operator to write is what runs.

- `doc_blocks`: a Markdown file's fenced blocks, with their language, line and mark;
- `certificate`: a CA and a certificate it signed for the guide's names (openssl);
- `run_nginx`, `run_caddy`: the proxy as a daemon of its own, with the guide's config, the
  node addresses, the listening port and the certificate paths put in; stopped at the end;
- `ProxyClient`: HTTPS to the proxy on 127.0.0.1 with the right SNI and Host, no keep-alive
  (each request a new connection, as from many clients).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

#: The node addresses the guide names, in order; a test puts its nodes' ports in their place.
GUIDE_NODES = ("10.0.0.11:8080", "10.0.0.12:8080")
LETSENCRYPT = "/etc/letsencrypt/live"


@dataclass(frozen=True, slots=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence, 1-based
    mark: str = ""  # the HTML comment just above the fence, or ""


def doc_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        fence = re.fullmatch(r"```(\S*)\s*", lines[index])
        if fence is None:
            index += 1
            continue
        start, body = index, []
        index += 1
        while not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        above = lines[start - 1].strip() if start else ""
        mark = above if above.startswith("<!--") else ""
        blocks.append(Block(fence.group(1), "\n".join(body) + "\n", start + 1, mark))
        index += 1
    return blocks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Certificate:
    ca: Path
    cert: Path
    key: Path

    def put_in(self, text: str) -> str:
        """`text` with the certificate paths of a config written for Let's Encrypt (the
        guide's, the README's) replaced by this certificate's."""
        text = re.sub(rf"{LETSENCRYPT}/[^ ;\n]+/fullchain\.pem", str(self.cert), text)
        return re.sub(rf"{LETSENCRYPT}/[^ ;\n]+/privkey\.pem", str(self.key), text)


async def certificate(folder: Path, names: tuple[str, ...]) -> Certificate:
    """A throwaway CA, and a certificate it signed for `names` (wildcards allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "san.ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    for command in (
        f"req -x509 {new_key} -keyout ca.key -out ca.pem -days 2 -subj /CN=proxy-kit-CA",
        f"req {new_key} -keyout key.pem -out cert.csr -subj /CN={names[0]}",
        "x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem "
        "-days 2 -extfile san.ext",
    ):
        with trio.fail_after(30):
            await trio.run_process(
                ["openssl", *command.split()], cwd=folder, capture_stdout=True, capture_stderr=True
            )
    return Certificate(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")


def with_nodes(text: str, ports: list[int]) -> str:
    for guide, port in zip(GUIDE_NODES, ports, strict=True):
        text = text.replace(guide, f"127.0.0.1:{port}")
    return text


@asynccontextmanager
async def run_nginx(
    folder: Path, site: str, nodes: list[int], cert: Certificate
) -> AsyncIterator[int]:
    """nginx with `site` (its `upstream` and `server` blocks), its port. `nodes`: the ports
    that take the place of the guide's nodes (none: `site` names its upstreams itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    listen = free_port()
    site = cert.put_in(with_nodes(site, nodes) if nodes else site)
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;")
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = folder / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.getuid() == 0 else "")
        + f"pid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'};\n"
        + "events {}\nhttp {\n"
        + f"    access_log {folder / 'access.log'};\n{temp}\n{site}}}\n"
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    # Daemon mode: the command returns once the master has bound its port.
    with trio.fail_after(30):
        await trio.run_process([nginx, "-c", str(conf), "-e", str(folder / "error.log")])
    try:
        yield listen
    finally:
        os.kill(int((folder / "nginx.pid").read_text()), signal.SIGTERM)


@asynccontextmanager
async def run_caddy(
    folder: Path, caddyfile: str, nodes: list[int], cert: Certificate
) -> AsyncIterator[int]:
    """Caddy with `caddyfile` (its sites; the global options are the kit's), its port."""
    folder.mkdir(parents=True, exist_ok=True)
    listen = free_port()
    options = (
        f"{{\n\tadmin off\n\thttps_port {listen}\n\thttp_port {free_port()}\n"
        f"\tdefault_bind 127.0.0.1\n\tstorage file_system {folder / 'data'}\n}}\n\n"
    )
    sites = with_nodes(caddyfile, nodes) if nodes else caddyfile
    (folder / "Caddyfile").write_text(options + cert.put_in(sites))
    env = {
        **os.environ,
        "HOME": str(folder),
        "XDG_DATA_HOME": str(folder / "data"),
        "XDG_CONFIG_HOME": str(folder / "config"),
    }
    caddy = shutil.which("caddy") or "/usr/bin/caddy"
    pidfile = folder / "caddy.pid"
    # `caddy start` returns once the server it started has loaded its config and listens.
    try:
        with open(folder / "caddy.log", "wb") as log, trio.fail_after(30):
            await trio.run_process(
                [
                    *(caddy, "start", "--config", str(folder / "Caddyfile")),
                    *("--adapter", "caddyfile", "--pidfile", str(pidfile)),
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        yield listen
    finally:
        if pidfile.exists():  # also when `caddy start` failed after its server began
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


class ProxyClient:
    """HTTPS through the proxy at 127.0.0.1:`port`, naming the host in SNI and Host."""

    def __init__(self, port: int, cert: Certificate) -> None:
        self.port = port
        self._client = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(cert.ca)),
            timeout=30,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def request(
        self,
        method: str,
        host: str,
        path: str,
        *,
        content: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self._client.request(
            method,
            f"https://127.0.0.1:{self.port}{path}",
            content=content,
            headers={"host": host, **(headers or {})},
            extensions={"sni_hostname": host},
        )

    async def aclose(self) -> None:
        await self._client.aclose()
