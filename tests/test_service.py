"""The service end to end: real server on loopback, real worker subprocesses, real SQLite file."""

from __future__ import annotations

import pytest
import trio

from tests.helpers import HELLO, Service, StartService, assert_json_error, counter_code


async def test_saved_val_answers_on_its_own_subdomain(service: Service) -> None:
    saved = await service.put_val("hello", HELLO)
    assert saved.status_code == 201
    assert saved.json()["url"] == f"http://alice-hello.web.localhost:{service.port}/"
    with trio.fail_after(15):
        response = await service.web("alice", "hello", "/?name=bob")
    assert response.status_code == 200
    assert response.json() == {"greeting": "hi bob"}
    assert response.headers["access-control-allow-origin"] == "*"


async def test_val_sees_method_path_query_headers_and_body(service: Service) -> None:
    await service.put_val(
        "Echo",
        """
def Echo(req):
    return {"method": req.method, "url": req.url, "path": req.path,
            "q": req.query.getall("q"), "h": req.headers.get("X-Thing"), "body": req.text(),
            "json": req.json()}
""",
    )
    with trio.fail_after(15):
        response = await service.web(
            "alice",
            "echo",
            "/deep/path?q=1&q=2",
            "POST",
            headers={"x-thing": "yes"},
            json={"a": 1},
        )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "method": "POST",
        "url": f"http://alice-echo.web.localhost:{service.port}/deep/path?q=1&q=2",
        "path": "/deep/path",
        "q": ["1", "2"],
        "h": "yes",
        "body": '{"a":1}',
        "json": {"a": 1},
    }


@pytest.mark.parametrize(
    ("code", "content_type", "body"),
    [
        ("def v(req):\n    return '<b>hi</b>'", "text/html; charset=utf-8", b"<b>hi</b>"),
        ("def v(req):\n    return b'\\x00\\x01'", "application/octet-stream", b"\x00\x01"),
        ("def v(req):\n    return [1, 2]", "application/json", b"[1,2]"),
        ("def v(req):\n    return Response('plain', 201)", "text/plain; charset=utf-8", b"plain"),
    ],
)
async def test_return_types_become_responses(
    service: Service, code: str, content_type: str, body: bytes
) -> None:
    await service.put_val("v", code)
    with trio.fail_after(15):
        response = await service.web("alice", "v")
    assert response.headers["content-type"] == content_type
    assert response.content == body


async def test_module_state_lives_in_the_warm_worker(service: Service) -> None:
    await service.put_val("counter", counter_code(1))
    with trio.fail_after(15):
        counts = [(await service.web("alice", "counter")).json()["count"] for _ in range(3)]
    assert counts == [1, 2, 3]


async def test_new_version_gets_a_new_worker(service: Service) -> None:
    await service.put_val("counter", counter_code(1))
    with trio.fail_after(20):
        await service.web("alice", "counter")
        await service.web("alice", "counter")
        saved = await service.put_val("counter", counter_code(2))
        assert (saved.status_code, saved.json()["version"]) == (200, 2)
        response = await service.web("alice", "counter")
    assert response.json() == {"count": 1, "version": 2}


async def test_deleted_val_answers_404_at_once(service: Service) -> None:
    await service.put_val("hello", HELLO)
    with trio.fail_after(15):
        assert (await service.web("alice", "hello")).status_code == 200
        assert (await service.api("DELETE", "/v1/vals/alice/hello")).status_code == 200
        response = await service.web("alice", "hello")
    assert_json_error(response, 404, "unknown_val")
    assert response.headers["access-control-allow-origin"] == "*"


async def test_val_names_are_case_insensitive(service: Service) -> None:
    await service.put_val("myEndpoint", "def myEndpoint(req):\n    return 'v1'")
    saved = await service.put_val("MYENDPOINT", "def myEndpoint(req):\n    return 'v2'")
    assert (saved.json()["name"], saved.json()["version"]) == ("myEndpoint", 2)
    with trio.fail_after(15):
        assert (await service.web("alice", "myendpoint")).text == "v2"


@pytest.mark.parametrize(
    ("host", "status", "error_type"),
    [
        ("nobody-hello.web.localhost", 404, "unknown_val"),
        ("alice-nosuch.web.localhost", 404, "unknown_val"),
        ("example.com", 404, "unknown_host"),
        ("web.localhost", 404, "unknown_host"),
        ("a.alice-hello.web.localhost", 404, "unknown_host"),
        ("bad host!", 400, "bad_host"),
        ("[::1", 400, "bad_host"),
        ("alice-hello.web.localhost:99999", 400, "bad_host"),
    ],
)
async def test_bad_and_unknown_hosts_get_json_errors_with_cors(
    service: Service, host: str, status: int, error_type: str
) -> None:
    response = await service.client.get("/", headers={"host": host})
    assert_json_error(response, status, error_type)
    assert response.headers["access-control-allow-origin"] == "*"


async def test_val_error_names_the_vals_line_and_no_host_path(service: Service) -> None:
    await service.put_val("boom", "def boom(req):\n    x = 1\n    return x / 0\n")
    with trio.fail_after(15):
        response = await service.web("alice", "boom")
    error = assert_json_error(response, 502, "val_error")
    assert error["message"].startswith("ZeroDivisionError: division by zero")
    assert "line 3" in error["message"]
    assert error["traceback"] == ["line 3, in boom"]  # type: ignore[comparison-overlap]
    for host_detail in ("/work", "site-packages", ".py", "sandbox", "RestrictedPython"):
        assert host_detail not in response.text


async def test_val_that_fails_to_load_answers_502_then_recovers_when_fixed(
    service: Service,
) -> None:
    # Saving checks what it can without running the code; this fails only when it runs.
    await service.put_val("fix", "import json\njson.loads('{')\ndef fix(req):\n    return 'no'")
    with trio.fail_after(20):
        error = assert_json_error(await service.web("alice", "fix"), 502, "val_error")
        # Anyone may call the web host: they learn that it failed, its owner reads why.
        assert "failed to load" in error["message"]
        assert "JSONDecodeError" not in error["message"]
        runs = await service.api("GET", "/v1/vals/alice/fix/runs")
        assert "JSONDecodeError" in runs.json()["runs"][0]["error"]["message"]
        await service.put_val("fix", "def fix(req):\n    return 'fixed'")
        assert (await service.web("alice", "fix")).text == "fixed"


async def test_body_over_the_limit_is_413_before_any_worker(start_service: StartService) -> None:
    service = await start_service(max_request_body_bytes=1000)
    await service.put_val("hello", HELLO)
    with trio.fail_after(15):
        response = await service.web("alice", "hello", "/", "POST", content=b"x" * 1001)
        assert_json_error(response, 413, "request_too_large")
        health = (await service.api("GET", "/healthz", user=None)).json()
    assert health["workers"]["idle"] + health["workers"]["busy"] == 0


async def test_hung_val_gets_504_and_the_next_request_works(service: Service) -> None:
    await service.put_val(
        "slow",
        """
import time
def slow(req):
    if req.query.get("hang"):
        try:
            time.sleep(60)
        except BaseException:
            time.sleep(60)   # swallowing the interruption does not help
    return "awake"
""",
    )
    await service.put_val("hello", HELLO)
    with trio.fail_after(25):
        started = trio.current_time()
        response = await service.web("alice", "slow", "/?hang=1")
        elapsed = trio.current_time() - started
        assert_json_error(response, 504, "timeout")
        assert elapsed < service.config.limits.wall_time_s + 2
        assert (await service.web("alice", "slow")).text == "awake"
        assert (await service.web("alice", "hello")).status_code == 200


async def test_cpu_spin_in_a_c_loop_is_stopped(start_service: StartService) -> None:
    service = await start_service(cpu_time_s=1, wall_time_s=10.0)
    await service.put_val("spin", "def spin(req):\n    return all(range(1, 10**12))")
    with trio.fail_after(30):
        started = trio.current_time()
        response = await service.web("alice", "spin")
        # RLIMIT_CPU's SIGXCPU stops it after ~1 s of CPU, long before the 10 s wall clock
        # (the margin is for a busy machine, where a nice-10 worker gets its CPU slowly).
        assert_json_error(response, 502, "cpu_limit")
        assert trio.current_time() - started < 8
        await service.put_val("hello", HELLO)
        assert (await service.web("alice", "hello")).status_code == 200


async def test_memory_bomb_gets_502_memory_limit(service: Service) -> None:
    await service.put_val("bomb", "def bomb(req):\n    return len('x' * (1024 * 1024 * 1024))")
    with trio.fail_after(20):
        assert_json_error(await service.web("alice", "bomb"), 502, "memory_limit")
        await service.put_val("hello", HELLO)
        assert (await service.web("alice", "hello")).status_code == 200


async def test_response_over_the_limit_is_502(start_service: StartService) -> None:
    service = await start_service(max_response_body_bytes=10_000)
    await service.put_val("big", "def big(req):\n    return 'x' * 10001")
    with trio.fail_after(15):
        assert_json_error(await service.web("alice", "big"), 502, "response_too_large")


@pytest.mark.parametrize(
    "headers",
    [
        '{"x-evil": "a\\r\\nSet-Cookie: stolen=1"}',
        '{"x-evil": "a\\nb"}',
        '{"x-evil": "a\\x00b"}',
        '{"bad name": "v"}',
        '{"x-\\u00e9": "v"}',
        '[("x", "y")] * 101',
    ],
)
async def test_header_injection_is_refused(service: Service, headers: str) -> None:
    await service.put_val("inject", f"def inject(req):\n    return Response('x', 200, {headers})")
    with trio.fail_after(15):
        assert_json_error(await service.web("alice", "inject"), 502, "bad_response")


async def test_cookie_for_a_wider_domain_is_dropped(service: Service) -> None:
    await service.put_val(
        "cookies",
        """
def cookies(req):
    return Response("ok", 200, [
        ("set-cookie", "wide=1; Domain=web.localhost"),
        ("set-cookie", "tld=1; Domain=.localhost"),
        ("set-cookie", "other=1; Domain=bob-x.web.localhost"),
        ("set-cookie", "own=1; Domain=alice-cookies.web.localhost"),
        ("set-cookie", "plain=1; Path=/"),
        ("content-length", "999"),
    ])
""",
    )
    with trio.fail_after(15):
        response = await service.web("alice", "cookies")
    assert response.headers.get_list("set-cookie") == [
        "own=1; Domain=alice-cookies.web.localhost",
        "plain=1; Path=/",
    ]
    assert response.headers["content-length"] == "2"


@pytest.mark.parametrize(
    ("val_headers", "expected_acao"),
    [
        ("{}", "*"),
        ('{"Access-Control-Allow-Origin": ""}', ""),
        ('{"access-control-max-age": "5"}', None),
    ],
)
async def test_cors_defaults_apply_unless_the_val_sets_any_cors_header(
    service: Service, val_headers: str, expected_acao: str | None
) -> None:
    await service.put_val("c", f"def c(req):\n    return Response('x', 200, {val_headers})")
    with trio.fail_after(15):
        response = await service.web("alice", "c")
    assert response.headers.get("access-control-allow-origin") == expected_acao
    assert ("access-control-allow-methods" in response.headers) == (val_headers == "{}")


async def test_preflight_reaches_the_val_and_mirrors_requested_headers(service: Service) -> None:
    await service.put_val(
        "pre", "def pre(req):\n    return Response('', 204 if req.method == 'OPTIONS' else 200)"
    )
    with trio.fail_after(15):
        response = await service.web(
            "alice",
            "pre",
            "/",
            "OPTIONS",
            headers={
                "origin": "http://elsewhere.localhost",
                "access-control-request-method": "PUT",
                "access-control-request-headers": "x-custom, content-type",
            },
        )
    assert response.status_code == 204
    assert response.headers["access-control-allow-headers"] == "x-custom, content-type"
    assert response.headers["access-control-allow-methods"] == "GET,HEAD,PUT,PATCH,POST,DELETE"


async def test_full_queue_answers_503_with_retry_after(start_service: StartService) -> None:
    service = await start_service(max_queue_per_val=1, max_workers_per_val=1)
    await service.put_val(
        "slow", "import time\ndef slow(req):\n    time.sleep(0.5)\n    return 'ok'"
    )
    statuses: list[int] = []
    retry_after: list[str | None] = []

    async def call() -> None:
        response = await service.web("alice", "slow")
        statuses.append(response.status_code)
        retry_after.append(response.headers.get("retry-after"))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(call)
                await trio.sleep(0.05)
    assert sorted(statuses) == [200, 200, 503, 503]
    assert retry_after.count("1") == 2


async def test_a_failing_val_does_not_disturb_another(service: Service) -> None:
    await service.put_val("hello", HELLO)
    await service.put_val("hang", "import time\ndef hang(req):\n    time.sleep(60)")
    results: dict[str, int] = {}
    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:

            async def hang() -> None:
                results["hang"] = (await service.web("alice", "hang")).status_code

            nursery.start_soon(hang)
            await trio.sleep(0.2)
            started = trio.current_time()
            results["hello"] = (await service.web("alice", "hello")).status_code
            hello_s = trio.current_time() - started
    assert results == {"hang": 504, "hello": 200}
    assert hello_s < 2


async def test_env_reaches_the_val_and_is_never_listed(service: Service) -> None:
    put = await service.api("PUT", "/v1/env/SECRET", content=b"s3cret-value")
    assert put.status_code == 200
    await service.put_val("showenv", "def showenv(req):\n    return {'secret': env.get('SECRET')}")
    with trio.fail_after(15):
        assert (await service.web("alice", "showenv")).json() == {"secret": "s3cret-value"}
    listing = await service.api("GET", "/v1/env")
    assert listing.json() == {"keys": ["SECRET"]}
    assert "s3cret" not in listing.text
    assert (await service.api("DELETE", "/v1/env/SECRET")).status_code == 200
    assert (await service.api("GET", "/v1/env")).json() == {"keys": []}


async def test_express_paths_redirect_308_to_the_subdomain(service: Service) -> None:
    for path in ("/v1/express/alice.hello/a/b?x=1&y=2", "/express/@alice.hello/a/b?x=1&y=2"):
        response = await service.api("POST", path, user=None, content=b"kept")
        assert response.status_code == 308
        assert response.headers["location"] == (
            f"http://alice-hello.web.localhost:{service.port}/a/b?x=1&y=2"
        )


async def test_a_half_sent_body_never_reaches_the_val(service: Service) -> None:
    await service.put_val("counter", counter_code(1))
    head = (
        "POST / HTTP/1.1\r\n"
        f"Host: alice-counter.web.localhost:{service.port}\r\n"
        "Content-Length: 100\r\n\r\n"
    )
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", service.port)
        await stream.send_all(head.encode() + b"only ten b")
        await stream.aclose()  # gone, with 90 bytes never sent
        await trio.sleep(0.3)  # what the server does with it happens now, or never
        response = await service.web("alice", "counter")
    assert response.json()["count"] == 1  # the first request the val ever ran


async def test_a_raised_source_limit_reaches_the_worker(start_service: StartService) -> None:
    service = await start_service(max_source_bytes=400_000)
    big = "def big(req):\n    return 'ran'\n" + "#" * 300_000 + "\n"  # over the default 256 KiB
    await service.put_val("big", big)
    with trio.fail_after(15):
        response = await service.web("alice", "big")
    assert (response.status_code, response.text) == (200, "ran")
