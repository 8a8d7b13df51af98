"""The Python people expect (issue 13): strptime, the added facades, str.format, enum classes,
multipart forms, and `async def` refused at save; through the real server, in confined workers.
"""

from __future__ import annotations

import textwrap

import pytest

from sandbox.http import Request
from sandbox.multipart import MAX_PART_HEADER_BYTES, MAX_PARTS, parse_multipart, parse_params
from tests.helpers import Service, assert_json_error

EVERYDAY = textwrap.dedent(
    """
    import bisect, csv, datetime, enum, functools, heapq, io, operator, statistics
    import textwrap, time, typing, zoneinfo
    from typing import Optional

    class Color(enum.Enum):
        RED = 1
        GREEN = enum.auto()

    class Perm(enum.IntFlag):
        READ = 1
        WRITE = 2

    @functools.lru_cache(maxsize=64)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    @functools.total_ordering
    class Version:
        def __init__(self, n):
            self.n = n
        def __eq__(self, other):
            return self.n == other.n
        def __lt__(self, other):
            return self.n < other.n

    def by_length(a, b):
        return len(b) - len(a)

    def everyday(req: Optional[object] = None) -> dict:
        out = io.StringIO()
        writer = csv.DictWriter(out, ["name", "note"])
        writer.writeheader()
        writer.writerow({"name": "a", "note": "x, y"})
        paris = zoneinfo.ZoneInfo("Europe/Paris")
        heap = [5, 1, 4]
        heapq.heapify(heap)
        return {
            "datetime_strptime": datetime.datetime.strptime("2024-03-01 10:30", "%Y-%m-%d %H:%M")
            .isoformat(),
            "time_strptime": list(time.strptime("2024-12-25", "%Y-%m-%d")[:3]),
            "paris_summer": str(datetime.datetime(2024, 7, 1, 12, tzinfo=paris).utcoffset()),
            "paris_winter": str(datetime.datetime(2024, 1, 1, 12, tzinfo=paris).utcoffset()),
            "tokyo": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
            .astimezone(zoneinfo.ZoneInfo("Asia/Tokyo")).hour,
            "zones": len(zoneinfo.available_timezones()) > 300,
            "reduce": functools.reduce(operator.mul, range(1, 6)),
            "partial": functools.partial(int, base=16)("ff"),
            "fib": fib(80),
            "hits": fib.cache_info().hits > 0,
            "cmp": sorted(["bb", "a", "ccc"], key=functools.cmp_to_key(by_length)),
            "ordering": Version(1) <= Version(2),
            "stats": [statistics.mean([1, 2, 3, 4]), statistics.median([3, 1, 2]),
                      round(statistics.stdev([2, 4, 4, 4, 5, 5, 7, 9]), 3)],
            "itemgetter": sorted([(1, "b"), (2, "a")], key=operator.itemgetter(1)),
            "bisect": bisect.bisect_left([10, 20, 30], 25),
            "heap": [heapq.heappop(heap), heapq.nlargest(1, [3, 9, 2])],
            "wrap": textwrap.wrap("the quick brown fox", width=10),
            "csv_out": out.getvalue(),
            "csv_in": list(csv.reader(["a,\\"b,c\\""])),
            "enum": [Color.RED.name, Color.GREEN.value, Color(2).name, [c.name for c in Color]],
            "flag": [int(Perm.READ | Perm.WRITE), Perm.WRITE in (Perm.READ | Perm.WRITE)],
            "format": "{0}-{name}-{items[1]}-{0:>4}-{pi:.2f}".format(
                7, name="n", items=[1, 2], pi=3.14159),
            "format_attr": "{d.year}".format(d=datetime.date(2024, 1, 2)),
            "format_map": "{a} and {b}".format_map({"a": 1, "b": 2}),
            "typing": typing.cast(int, "kept"),
        }
    """
)


async def test_everyday_stdlib_works_in_a_confined_worker(service: Service) -> None:
    await service.put_val("everyday", EVERYDAY)
    response = await service.api("GET", "/v1/run/alice.everyday?args=[]", user=None)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "datetime_strptime": "2024-03-01T10:30:00",
        "time_strptime": [2024, 12, 25],
        "paris_summer": "2:00:00",
        "paris_winter": "1:00:00",
        "tokyo": 9,
        "zones": True,
        "reduce": 120,
        "partial": 255,
        "fib": 23416728348467685,
        "hits": True,
        "cmp": ["ccc", "bb", "a"],
        "ordering": True,
        "stats": [2.5, 2, 2.138],
        "itemgetter": [[2, "a"], [1, "b"]],
        "bisect": 2,
        "heap": [1, [9]],
        "wrap": ["the quick", "brown fox"],
        "csv_out": 'name,note\r\na,"x, y"\r\n',
        "csv_in": [["a", "b,c"]],
        "enum": ["RED", 2, "GREEN", ["RED", "GREEN"]],
        "flag": [3, True],
        "format": "7-n-2-   7-3.14",
        "format_attr": "2024",
        "format_map": "1 and 2",
        "typing": "kept",
    }


async def test_an_unknown_zone_is_the_vals_own_error(service: Service) -> None:
    code = "import zoneinfo\ndef zone(req):\n    return str(zoneinfo.ZoneInfo('Mars/Olympus'))\n"
    await service.put_val("zone", code)
    error = assert_json_error(await service.web("alice", "zone"), 502, "val_error")
    assert "ZoneInfoNotFoundError" in error["message"]


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        ("async def handler(req):\n    return 'x'\n", "write 'def', not 'async def'"),
        ("def handler(req):\n    return 1\nasync def helper():\n    pass\n", "not 'async def'"),
        ("import asyncio\ndef handler(req):\n    return 1\n", "write 'def' handlers"),
    ],
)
async def test_async_code_is_refused_at_save_saying_to_use_def(
    service: Service, code: str, fragment: str
) -> None:
    response = await service.api("PUT", "/v1/vals/alice/handler", json={"code": code})
    error = assert_json_error(response, 400, "bad_code")
    assert fragment in error["message"]


async def test_async_eval_is_refused_saying_to_use_def(service: Service) -> None:
    code = "async def f():\n    return 1\nf"
    response = await service.api("POST", "/v1/eval", json={"code": code})
    error = assert_json_error(response, 502, "val_error")
    assert "write 'def', not 'async def'" in error["message"]


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        ("requests", "std.fetch"),
        ("urllib.request", "std.fetch"),
        ("http.client", "std.fetch"),
        ("socket", "std.fetch"),
        ("sqlite3", "std.sqlite"),
        ("os", "no operating system access"),
        ("subprocess", "no operating system access"),
        ("dataclasses", "collections.namedtuple"),
        ("pickle", "use json"),
    ],
)
async def test_a_refused_import_says_what_to_use_instead(
    service: Service, module: str, fragment: str
) -> None:
    code = f"import {module}\ndef handler(req):\n    return 1\n"
    response = await service.api("PUT", "/v1/vals/alice/handler", json={"code": code})
    error = assert_json_error(response, 400, "bad_code")
    assert f"import of {module!r} is not allowed in a val" in error["message"]
    assert fragment in error["message"]


# --- multipart/form-data ----------------------------------------------------------------------

UPLOAD = """
def upload(req):
    form = req.form()
    return {
        "fields": form.items(),
        "files": [[f.name, f.filename, f.content_type, f.size, f.text()] for f in form.files],
        "first": form.file("doc").filename if form.file("doc") else None,
    }
"""


async def test_multipart_form_gives_fields_and_files(service: Service) -> None:
    await service.put_val("upload", UPLOAD)
    response = await service.web(
        "alice",
        "upload",
        "/",
        "POST",
        data={"title": "Résumé", "tag": ["a", "b"]},
        files={"doc": ("notes.txt", b"line 1\r\n--not a boundary\r\n", "text/plain")},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "fields": [["title", "Résumé"], ["tag", "a"], ["tag", "b"]],
        "files": [["doc", "notes.txt", "text/plain", 26, "line 1\r\n--not a boundary\r\n"]],
        "first": "notes.txt",
    }


async def test_urlencoded_form_still_works_and_has_no_files(service: Service) -> None:
    await service.put_val("upload", UPLOAD)
    response = await service.web("alice", "upload", "/", "POST", data={"a": "1"})
    assert response.json() == {"fields": [["a", "1"]], "files": [], "first": None}


async def test_a_malformed_multipart_body_is_a_value_error_the_val_can_catch(
    service: Service,
) -> None:
    code = (
        "def strict(req):\n    try:\n        req.form()\n    except ValueError as exc:\n"
        "        return Response(str(exc), 400)\n    return 'parsed'\n"
    )
    await service.put_val("strict", code)
    headers = {"content-type": "multipart/form-data; boundary=b"}
    response = await service.web(
        "alice", "strict", "/", "POST", content=b"--b\r\n", headers=headers
    )
    assert (response.status_code, response.text) == (
        400,
        "the multipart body ends before its closing boundary",
    )


def multipart(parts: list[bytes], boundary: bytes = b"B") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + (
        b"--" + boundary + b"--\r\n"
    )


FIELD = b'Content-Disposition: form-data; name="f"\r\n\r\nv'


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (multipart([FIELD]), "multipart/form-data", "no valid boundary"),
        (multipart([FIELD]), "multipart/form-data; boundary=" + "x" * 71, "no valid boundary"),
        (multipart([FIELD]), "multipart/mixed; boundary=B", "not a multipart/form-data"),
        (b"no boundary here", "multipart/form-data; boundary=B", "holds no part"),
        (b"--B\r\n" + FIELD, "multipart/form-data; boundary=B", "ends before its closing"),
        (b"--Bjunk\r\n" + FIELD + b"\r\n--B--", "multipart/form-data; boundary=B", "malformed"),
        (multipart([b"X-No-Colon\r\n\r\nv"]), "multipart/form-data; boundary=B", "header line"),
        (
            multipart([b"Content-Type: text/plain\r\n\r\nv"]),
            "multipart/form-data; boundary=B",
            "no 'Content-Disposition: form-data; name=...'",
        ),
        (
            multipart([b"X: " + b"a" * MAX_PART_HEADER_BYTES + b"\r\n\r\nv"]),
            "multipart/form-data; boundary=B",
            f"over {MAX_PART_HEADER_BYTES} bytes",
        ),
        (
            multipart([FIELD] * (MAX_PARTS + 1)),
            "multipart/form-data; boundary=B",
            f"more than {MAX_PARTS} parts",
        ),
    ],
)
def test_malformed_multipart_bodies_are_refused(
    body: bytes, content_type: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_multipart(body, content_type)


def test_multipart_takes_preamble_quoted_names_and_rfc_8187_filenames() -> None:
    body = b"preamble\r\n" + multipart(
        [
            b'Content-Disposition: form-data; name="a \\"q\\""\r\n\r\n1',
            b"Content-Disposition: form-data; name=up; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf\r\n"
            b"Content-Type: application/pdf\r\n\r\n%PDF",
            b'Content-Disposition: form-data; name="empty"\r\n\r\n',
        ]
    )
    parts = parse_multipart(body, 'multipart/form-data; boundary="B"')
    assert [(p.name, p.filename, p.content_type, p.body) for p in parts] == [
        ('a "q"', None, "text/plain", b"1"),
        ("up", "résumé.pdf", "application/pdf", b"%PDF"),
        ("empty", None, "text/plain", b""),
    ]


def test_exactly_max_parts_is_accepted() -> None:
    parts = parse_multipart(multipart([FIELD] * MAX_PARTS), "multipart/form-data; boundary=B")
    assert len(parts) == MAX_PARTS


def test_params_parse_like_browsers_send_them() -> None:
    assert parse_params('Form-Data; name="x"; filename="a;b.txt"') == (
        "form-data",
        {"name": "x", "filename": "a;b.txt"},
    )


def test_urlencoded_fields_are_bounded_too() -> None:
    body = "&".join(f"k{i}=v" for i in range(MAX_PARTS + 1)).encode()
    request = Request("POST", "http://h/", "/", "", [], body)
    with pytest.raises(ValueError, match="over the limit of 1000"):
        request.form()
