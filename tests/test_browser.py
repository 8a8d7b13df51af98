"""CORS as a real browser sees it: headless Chromium fetches vals across origins.

The browser is the judge. A page served by one val (`alice-page.web.localhost`) fetch()es other
vals on their own origins; each case asserts what the page's JavaScript could read, or that the
fetch rejected and Chromium logged why CORS blocked it. No CORS header is asserted here: what
counts is whether a browser lets a page on another origin read the answer (docs/contract.md §6).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.helpers import Service

pytestmark = pytest.mark.browser

T = TypeVar("T")

CHROMIUM = Path("/usr/bin/chromium")
# Root in a container with no network: no sandbox, no GPU, and nothing that phones home.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Each browser step; a cold worker answers in well under a second.
STEP_TIMEOUT_S = 20
FETCH_TIMEOUT_MS = 10_000

# Runs in the page. A fetch that CORS blocks rejects with a bare TypeError; the reason only
# reaches the console, which `Tab.fetch` collects.
FETCH_JS = """
async ([url, init, timeoutMs]) => {
  try {
    const r = await fetch(url, {...init, signal: AbortSignal.timeout(timeoutMs)});
    return {ok: true, status: r.status, body: await r.text(),
            headers: Object.fromEntries(r.headers.entries())};
  } catch (e) {
    return {ok: false, error: String(e)};
  }
}
"""

PAGE = """
def page(req):
    return "<!doctype html><title>origin</title><p>the page origin</p>"
"""

# Reports what actually arrived, so a case can tell the real request from the preflight.
ECHO = """
def echo(req):
    return Response.json({
        "method": req.method,
        "body": req.text(),
        "content_type": req.headers.get("content-type"),
        "custom": req.headers.get("x-custom"),
    })
"""

OPT_OUT = """
def optout(req):
    return Response("secret", headers={"Access-Control-Allow-Origin": ""})
"""

ELSEWHERE = """
def elsewhere(req):
    return Response.json({"secret": 1}, headers={"Access-Control-Allow-Origin": "https://example.com"})
"""

# Answers its own preflight: GET only, and no Access-Control-Allow-Headers at all.
OWN_PREFLIGHT = """
def ownpreflight(req):
    if req.method == "OPTIONS":
        return Response("", status=204, headers={
            "Access-Control-Allow-Origin": "*",
            "Access-Control-Allow-Methods": "GET",
        })
    return Response.json({"method": req.method, "custom": req.headers.get("x-custom")})
"""


@dataclass
class Fetched:
    """What the page's JavaScript got back, plus what Chromium logged meanwhile."""

    ok: bool
    status: int | None = None
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    console: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def cors_error(self) -> str:
        """Chromium's console line saying why CORS blocked the fetch, or ""."""
        return next((line for line in self.console if "blocked by CORS policy" in line), "")

    def blocked_because(self, reason: str) -> bool:
        return not self.ok and "TypeError" in self.error and reason in self.cors_error


class Chromium:
    """One headless Chromium for the module, owned by one thread.

    Playwright's sync API is bound to the thread that started it and blocks, while the server
    under test runs on the trio loop; so every browser step is submitted to a single-thread
    executor and awaited from trio through `trio.to_thread`.
    """

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._browser: Browser = self._thread.submit(self._launch).result(timeout=60)

    def _launch(self) -> Browser:
        self._playwright = sync_playwright().start()
        return self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS
        )

    def close(self) -> None:
        def stop() -> None:
            self._browser.close()
            self._playwright.stop()

        self._thread.submit(stop).result(timeout=30)
        self._thread.shutdown()

    async def run(self, fn: Callable[[], T]) -> T:
        with trio.fail_after(STEP_TIMEOUT_S):
            # abandon_on_cancel: a hung browser step must not keep the timeout from firing.
            return await trio.to_thread.run_sync(
                lambda: self._thread.submit(fn).result(), abandon_on_cancel=True
            )

    async def open(self, url: str) -> Tab:
        def open_page() -> tuple[BrowserContext, Page]:
            # A fresh context per test: no preflight cache or cookies carried between cases.
            context = self._browser.new_context()
            page = context.new_page()
            response = page.goto(url)
            assert response is not None, "the page val got no response"
            assert response.ok, f"the page val did not load: {response}"
            return context, page

        context, page = await self.run(open_page)
        return Tab(self, context, page)


@dataclass
class Tab:
    chromium: Chromium
    context: BrowserContext
    page: Page

    async def fetch(self, url: str, **init: Any) -> Fetched:
        def run() -> Fetched:
            console: list[str] = []

            def collect(message: ConsoleMessage) -> None:
                console.append(message.text)

            self.page.on("console", collect)
            try:
                result = self.page.evaluate(FETCH_JS, [url, init, FETCH_TIMEOUT_MS])
                if not result["ok"] and not any("CORS policy" in line for line in console):
                    # The console line can trail the rejection; events only arrive while a
                    # playwright call waits, so nothing slips between the check and this wait.
                    with contextlib.suppress(PlaywrightTimeoutError):
                        # Not blocked by CORS then: `cors_error` stays empty and the case's
                        # assertion shows the error and console instead.
                        self.page.wait_for_event(
                            "console", lambda m: "CORS policy" in m.text, timeout=5_000
                        )
            finally:
                self.page.remove_listener("console", collect)
            return Fetched(**result, console=console)

        return await self.chromium.run(run)

    async def close(self) -> None:
        await self.chromium.run(self.context.close)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    if not CHROMIUM.exists():
        # Never a skip: a skipped browser test would hide a missing dependency in CI.
        pytest.fail(
            f"{CHROMIUM} is missing; ./scripts/test installs Debian's chromium "
            "(apt-get install chromium). Playwright's own browser download is not used."
        )
    browser = Chromium()
    yield browser
    browser.close()


@pytest.fixture
async def tab(chromium: Chromium, service: Service) -> AsyncIterator[Tab]:
    await service.put_val("page", PAGE)
    tab = await chromium.open(f"http://{service.web_host('alice', 'page')}/")
    yield tab
    await tab.close()


def url(service: Service, val: str, path: str = "/") -> str:
    return f"http://{service.web_host('alice', val)}{path}"


async def test_default_cors_lets_a_page_read_a_simple_get(service: Service, tab: Tab) -> None:
    await service.put_val("echo", ECHO)
    fetched = await tab.fetch(url(service, "echo", "/?q=1"))
    assert fetched.ok, fetched
    assert fetched.status == 200
    assert fetched.json()["method"] == "GET"


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [
        pytest.param("POST", {"Content-Type": "application/json"}, '{"n": 1}', id="json-post"),
        pytest.param("PUT", {"X-Custom": "1"}, "put body", id="put-custom-header"),
        pytest.param("DELETE", {"X-Custom": "1"}, None, id="delete-custom-header"),
    ],
)
async def test_preflighted_request_passes_default_cors_and_reaches_the_val(
    service: Service, tab: Tab, method: str, headers: dict[str, str], body: str | None
) -> None:
    await service.put_val("echo", ECHO)
    init: dict[str, Any] = {"method": method, "headers": headers}
    if body is not None:
        init["body"] = body
    fetched = await tab.fetch(url(service, "echo"), **init)
    assert fetched.ok, fetched
    assert fetched.status == 200
    seen = fetched.json()
    assert seen["method"] == method
    assert seen["body"] == (body or "")
    assert seen["custom"] == headers.get("X-Custom")
    if "Content-Type" in headers:
        assert seen["content_type"] == headers["Content-Type"]


# The reasons are fragments of Chromium's console message: they show the page was refused for
# the reason the case is about, not because the server failed.
@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [
        pytest.param("optout", OPT_OUT, "contains the invalid value ''", id="empty-allow-origin"),
        pytest.param(
            "elsewhere",
            ELSEWHERE,
            "'https://example.com' that is not equal to the supplied origin",
            id="other-allow-origin",
        ),
    ],
)
async def test_val_that_sets_its_own_allow_origin_gets_no_defaults(
    service: Service, tab: Tab, name: str, code: str, reason: str
) -> None:
    await service.put_val(name, code)
    fetched = await tab.fetch(url(service, name))
    assert fetched.blocked_because(reason), fetched


NOT_ALLOWED_HEADER = "x-custom is not allowed by Access-Control-Allow-Headers in preflight"
NOT_ALLOWED_PUT = "Method PUT is not allowed by Access-Control-Allow-Methods in preflight"


# Had the front end added its defaults to the val's preflight, every one of these would pass.
@pytest.mark.parametrize(
    ("method", "headers", "blocked_because"),
    [
        pytest.param("GET", {}, None, id="simple-get-is-readable"),
        # Chromium checks the method first, so that is the reason it names.
        pytest.param("PUT", {"X-Custom": "1"}, NOT_ALLOWED_PUT, id="put-custom-header"),
        # POST is a CORS-safelisted method: only the header the val did not allow blocks it.
        pytest.param("POST", {"X-Custom": "1"}, NOT_ALLOWED_HEADER, id="post-custom-header"),
        # No custom header: only the method the val did not allow blocks it.
        pytest.param("PUT", {}, NOT_ALLOWED_PUT, id="plain-put"),
    ],
)
async def test_val_that_answers_its_own_preflight_is_honoured_as_answered(
    service: Service,
    tab: Tab,
    method: str,
    headers: dict[str, str],
    blocked_because: str | None,
) -> None:
    await service.put_val("ownpreflight", OWN_PREFLIGHT)
    fetched = await tab.fetch(url(service, "ownpreflight"), method=method, headers=headers)
    if blocked_because is None:
        assert fetched.ok, fetched
        assert fetched.json() == {"method": method, "custom": None}
    else:
        assert fetched.blocked_because(blocked_because), fetched


async def test_front_end_error_is_readable_cross_origin(service: Service, tab: Tab) -> None:
    fetched = await tab.fetch(url(service, "nosuch"))
    assert fetched.ok, fetched
    assert fetched.status == 404
    assert fetched.headers["content-type"].startswith("application/json")
    assert "error" in fetched.json()
