"""Attacks of one tenant on another (issue 17): what leaks, what the guards let through, what
workers share, and what a val's reply can do to its worker. Each class of weakness is tried
in several variations through the real server, and each test asserts the refusal and that
the service (and where it must, the very same worker) answers normally afterwards.
"""

from __future__ import annotations

import abc
import codecs
import collections
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import types
import typing
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime.config import Config, LimitsConfig, SandboxConfig, ServerConfig, StoreConfig
from runtime.logsafe import printable
from runtime.masking import forms, mask_secrets
from runtime.pool import Pool, ValSpec, open_pool
from runtime.reply import ValResponse
from runtime.server import serve_valrun
from runtime.store import Store
from sandbox.facades import Facade
from sandbox.messages import HttpRequest
from sandbox.policy import LogBuffer, guarded_getattr, make_globals
from sandbox.resolved import FORWARDING_TYPES, forwards, refusal
from tests.helpers import Service, StartService


def json_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == error_type, error
    assert error["message"]
    return error


async def assert_recovers(service: Service) -> None:
    await service.put_val("hello", "def hello(req):\n    return {'ok': req.query.get('q')}\n")
    response = await service.web("alice", "hello", "/?q=after")
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": "after"}


async def latest_record(service: Service, val: str) -> dict[str, Any]:
    runs = await service.api("GET", f"/v1/vals/alice/{val}/runs?limit=1")
    assert runs.status_code == 200, runs.text
    record: dict[str, Any] = runs.json()["runs"][0]
    return record


# --- Nothing private leaks: load errors -------------------------------------------------------

MARKER = "SOURCE_LINE_7f3a"

# Vals that fail to load with a message that would quote their source.
BROKEN = {
    "syntax": f"def broken(req):\n    return {MARKER} {MARKER}\n",
    "refused_name": f"{MARKER}_ok = 1\n_{MARKER} = 2\ndef broken(req):\n    return 1\n",
    "unclosed": f"def broken(req):\n    return ['{MARKER}'\n",
    "module_raises": f"raise ValueError('{MARKER}')\ndef broken(req):\n    return 1\n",
    "name_error": f"x = {MARKER}\ndef broken(req):\n    return 1\n",
}
# What does not compile is refused when saved, so no version of it is ever loaded.
REFUSED_AT_SAVE = frozenset({"syntax", "refused_name", "unclosed"})


@pytest.mark.parametrize("privacy", ["private", "public"])
async def test_load_error_never_quotes_the_source_to_others(service: Service, privacy: str) -> None:
    for kind, code in BROKEN.items():
        await service.api("DELETE", "/v1/vals/alice/broken")
        if kind in REFUSED_AT_SAVE:
            # Checks at save refuse it: only the owner, who sent it, reads why.
            saved = await service.api(
                "PUT", "/v1/vals/alice/broken", json={"code": code, "privacy": privacy}
            )
            json_error(saved, 400, "bad_code")
            continue
        await service.put_val("broken", code, privacy=privacy)
        # A second, good version: `?v=1` still reaches the broken one.
        await service.put_val("broken", "def broken(req):\n    return 'fine'\n")
        with trio.fail_after(30):
            await check_load_error_shown_only_to_owner(service, privacy, kind)
    await assert_recovers(service)


async def check_load_error_shown_only_to_owner(service: Service, privacy: str, kind: str) -> None:
    anonymous = [
        await service.web("alice", "broken", "/?v=1"),
        await service.api("POST", "/v1/run/alice.broken?v=1", user=None, json=[1]),
        await service.api("POST", "/v1/run/alice.broken?v=1", user="bob", json=[1]),
    ]
    for response in anonymous[: 1 if privacy == "private" else 3]:
        error = json_error(response, 502, "val_error")
        assert MARKER not in response.text
        assert MARKER.lower() not in response.text
        assert "failed to load" in error["message"]
        assert error["message"].endswith("its owner can read why in the val's invocation records")
    if privacy == "private":  # Run does not even reveal that it exists
        for response in anonymous[1:]:
            json_error(response, 404, "not_found")
    # Its owner sees the whole message, in the answer and in the record.
    own = await service.api("POST", "/v1/run/alice.broken?v=1", json=[1])
    assert MARKER in json_error(own, 502, "val_error")["message"], kind
    record = await latest_record(service, "broken")
    assert record["version"] == 1
    assert MARKER in record["error"]["message"], kind
    assert (await service.web("alice", "broken")).text == "fine", kind


# --- Nothing private leaks: env masking ---------------------------------------------------------

SECRETS = {
    "multi_line": "-----BEGIN KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n-----END KEY-----",
    "quotes": "pa'ss\"word'9\"x",
    "non_ascii": "sécret-ключ-€-🔑-tail",
    "backslashes": "C:\\Users\\admin\\token\\x41",
    "tab_and_bell": "left\tmiddle\x07right-end",
    "long": "tok_" + "q8ZrT2vLmXw9" * 30,  # over the 200 characters of %.200R
}

# Ways a val prints a value without meaning to: each is `leak(secret)` returning nothing
# useful and putting the secret somewhere Python prints it.
LEAKS = {
    "key_error": "def leak(s):\n    return {}[s]\n",
    "repr_in_message": "def leak(s):\n    raise ValueError('bad value %r' % s)\n",
    "repr_of_repr": "def leak(s):\n    raise KeyError(repr(s))\n",
    "json_escaped": "import json\ndef leak(s):\n    raise ValueError(json.dumps({'v': s}))\n",
    "ascii": "def leak(s):\n    raise ValueError(ascii(s))\n",
    "bytes": "def leak(s):\n    raise ValueError(repr(s.encode()))\n",
    "int_parse": "def leak(s):\n    return int(s, 16)\n",  # %.200R: Python cuts it
    "cut_by_valrun": "def leak(s):\n    raise ValueError('x' * 3480 + s)\n",
    "printed_then_raised": (
        "def leak(s):\n    print(s, repr(s), [s])\n    raise ValueError('see log')\n"
    ),
    "each_line": (
        "def leak(s):\n    for line in s.splitlines():\n        print(line)\n"
        "    raise ValueError(s.splitlines()[-1] if s.splitlines() else s)\n"
    ),
    "in_a_list": "def leak(s):\n    raise ValueError([s, {'k': s}])\n",
}


def assert_secret_absent(text: str, secret: str) -> None:
    for form in forms(secret):
        assert form not in text, (form, text[:3000])
    # Nor a distinctive run of it (a cut copy): 16 characters of the value, anywhere.
    core = secret.replace("\n", "")
    for start in range(0, max(1, len(core) - 16), 8):
        window = core[start : start + 16]
        assert len(window) < 16 or window not in text, (window, text[:3000])


async def test_env_values_are_masked_in_every_printed_form(service: Service) -> None:
    for key, secret in SECRETS.items():
        put = await service.api("PUT", f"/v1/env/{key.upper()}", content=secret.encode())
        assert put.status_code in (200, 201, 204), put.text
    for leak, code in LEAKS.items():
        name = leak.replace("_", "")
        code += f"\ndef {name}(req):\n    return leak(env[req.query.get('k')])\n"
        await service.put_val(name, code)
    with trio.fail_after(120):
        for leak in LEAKS:
            name = leak.replace("_", "")
            for key, secret in SECRETS.items():
                response = await service.web("alice", name, f"/?k={key.upper()}")
                assert response.status_code == 502, (leak, key, response.text)
                assert_secret_absent(response.text, secret)
                assert_secret_absent(response.json()["error"]["message"], secret)
                record = await latest_record(service, name)
                assert_secret_absent(json.dumps(record, ensure_ascii=False), secret)
                assert_secret_absent(record["log"] + record["error"]["message"], secret)
        await assert_recovers(service)


LONG = "tok_" + "q8ZrT2vLmXw9" * 30
ENV = (("KEY", "hunter2-secret"), ("LONG", LONG), ("ML", "line one\nline 'two'"))


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "x" * 10 + "hunter2-se\n[log truncated at 65536 bytes]",
            "x" * 10 + "[env KEY]\n[log truncated at 65536 bytes]",
        ),
        ("ValueError: " + "m" * 50 + "hunter", "ValueError: " + "m" * 50 + "[env KEY]"),
        ("cut: hunter2 [... 99 more characters]", "cut: [env KEY] [... 99 more characters]"),
        ("base 16: " + repr(LONG)[:201], "base 16: '[env LONG]"),
        ("KeyError: " + repr(repr("line one\nline 'two'")), "KeyError: '\"[env ML]\"'"),
        ("line one", "[env ML]"),
        ("hunt and hunter2 and hunter", "hunt and hunter2 and [env KEY]"),
        ("nothing of it here", "nothing of it here"),
    ],
    ids=["log-cut", "message-cut", "marker", "%.200R", "repr-of-repr", "one-line", "short", "none"],
)
def test_masking_catches_cut_and_escaped_values(text: str, masked: str) -> None:
    assert mask_secrets(text, ENV) == masked


@pytest.mark.parametrize(
    ("raw", "printed"),
    [
        ("/a\nGET /b", "/a\\x0aGET /b"),
        ("\r\x1b[2J\x7f\x85\u2028\u2029", "\\x0d\\x1b[2J\\x7f\\x85\\u2028\\u2029"),
        ("C:\\x0a", "C:\\\\x0a"),
        ("/ok/é/€", "/ok/é/€"),
    ],
)
def test_log_text_is_one_line_and_unambiguous(raw: str, printed: str) -> None:
    assert printable(raw) == printed


# --- Nothing private leaks: deleting a version ------------------------------------------------


async def test_owner_deletes_an_old_version_and_only_the_owner_may(service: Service) -> None:
    for n in (1, 2, 3):
        await service.put_val("v", f"def v(req):\n    print('version {n}')\n    return '{n}'\n")
    path = "/v1/vals/alice/v/versions"
    with trio.fail_after(30):
        assert (await service.web("alice", "v", "/?v=1")).text == "1"
        assert (await service.web("alice", "v", "/?v=2")).text == "2"
        json_error(await service.api("DELETE", f"{path}/1", user=None), 401, "unauthorized")
        json_error(await service.api("DELETE", f"{path}/1", user="bob"), 403, "forbidden")
        deleted = await service.api("DELETE", f"{path}/1")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"deleted": "alice/v", "version": 1}
        # Gone everywhere at once: its host, Run, the code, the list, its records.
        json_error(await service.web("alice", "v", "/?v=1"), 404, "unknown_val")
        json_error(await service.api("GET", "/v1/vals/alice/v?v=1"), 404, "not_found")
        json_error(await service.api("POST", "/v1/run/alice.v?v=1", json=[1]), 404, "not_found")
        listed = (await service.api("GET", path)).json()["versions"]
        assert [v["version"] for v in listed] == [2, 3]
        runs = (await service.api("GET", "/v1/vals/alice/v/runs")).json()["runs"]
        assert runs
        assert all(run["version"] != 1 for run in runs)
        # The latest stays: its number would be handed out again.
        latest = json_error(await service.api("DELETE", f"{path}/3"), 409, "latest_version")
        assert "save a new version first" in latest["message"]
        json_error(await service.api("DELETE", f"{path}/1"), 404, "not_found")
        json_error(await service.api("DELETE", f"{path}/99"), 404, "not_found")
        json_error(await service.api("DELETE", f"{path}/0"), 404, "not_found")
        json_error(await service.api("DELETE", "/v1/vals/alice/none/versions/1"), 404, "not_found")
        # Numbers are never reused: the next save is 4, and 2 still answers.
        saved = await service.put_val("v", "def v(req):\n    return '4'\n")
        assert saved.json()["version"] == 4
        assert (await service.web("alice", "v", "/?v=2")).text == "2"
        assert (await service.web("alice", "v")).text == "4"
        assert (await service.api("DELETE", f"{path}/3")).status_code == 200
        await assert_recovers(service)


# --- Nothing private leaks: the access log -----------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/a%0AGET%20/forged%20200%200.1ms%200B",
        "/a%0D%0Aforged",
        "/a%1B%5B2J%1B%5BHclear",
        "/a%C2%85next-line",  # NEL, a C1 control
        "/a%E2%80%A8separator",
        "/a%5Cx0afake-escape",  # a backslash: printed doubled, so no escape can be forged
    ],
)
async def test_access_log_escapes_control_characters(
    service: Service, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    with caplog.at_level(logging.INFO, logger="valrun.access"), trio.fail_after(15):
        await service.api("GET", f"/v1/vals/alice{path}", user=None)
        odd_host = await service.web("alice", "x", path, headers={"host": b"x\x85y.web.localhost"})
        assert odd_host.status_code == 400, odd_host.text
        # The access line is written once the answer is sent: it may follow it by a moment.
        while (
            len(lines := [r.getMessage() for r in caplog.records if r.name == "valrun.access"]) < 2
        ):
            await trio.sleep(0.01)
    assert len(lines) == 2, lines
    for line in lines:
        assert all(c.isprintable() and c not in "\x85\u2028" for c in line), repr(line)
    assert "\\x" in lines[0] or "\\u" in lines[0] or "\\\\" in lines[0], lines[0]
    assert "\\x85" in lines[1]


# --- The guards see through forwarding objects --------------------------------------------------

# Each attack returns {"escaped": True, ...} if it got what it reached for; a refusal raises.
GUARD_ATTACKS = {
    # str.format through a GenericAlias of a str subclass (any class with __class_getitem__)
    "format_via_alias": """
import collections
class S(str, collections.ChainMap):
    pass
def attack():
    f = S[int].format
    return {"escaped": True, "loot": f("{0.__class__}", 1)}
""",
    "format_map_via_alias": """
import collections
class S(str, collections.ChainMap):
    pass
def attack():
    return {"escaped": True, "loot": S[int].format_map("{x}", {"x": 1})}
""",
    "format_via_nested_alias": """
import collections
class S(str, collections.ChainMap):
    pass
def attack():
    return {"escaped": True, "loot": str(getattr(S[int], "format"))}
""",
    "format_via_getattr_default": """
import collections
class S(str, collections.ChainMap):
    pass
def attack():
    f = getattr(S[int], "format", None)
    if f is None:
        raise ValueError("refused: got the default")
    return {"escaped": True, "loot": str(f)}
""",
    "mro_via_list_alias": """
def attack():
    return {"escaped": True, "loot": str(list[int].mro())}
""",
    "mro_via_dict_alias": """
def attack():
    return {"escaped": True, "loot": str(dict[str, int].mro()[-1])}
""",
    "mro_via_tuple_alias": """
def attack():
    return {"escaped": True, "loot": str(tuple[int, ...].mro())}
""",
    "mro_via_own_class_alias": """
import collections
class C(collections.OrderedDict):
    pass
def attack():
    return {"escaped": True, "loot": str(C[int].mro())}
""",
    "object_via_deque_alias": """
import collections
def attack():
    return {"escaped": True, "loot": str(collections.deque[int].mro()[1]())}
""",
    "abc_register_via_alias": """
import collections
class Mine:
    pass
def attack():
    collections.ChainMap[int].register(Mine)
    return {"escaped": True, "loot": "registered"}
""",
    "abc_register_via_own_alias": """
import collections
class M(collections.ChainMap):
    pass
def attack():
    M[str, int].register(dict)
    return {"escaped": True, "loot": "registered"}
""",
    "abc_register_direct": """
import collections
def attack():
    collections.ChainMap.register(list)
    return {"escaped": True, "loot": "registered"}
""",
    "hasattr_probe": """
import collections
def attack():
    if hasattr(list[int], "mro") or hasattr(collections.ChainMap[int], "register"):
        return {"escaped": True, "loot": "hasattr saw it"}
    raise ValueError("refused: hasattr saw nothing")
""",
    "setattr_on_alias": """
import collections
def attack():
    setattr(collections.ChainMap[int], "maps", 1)
    return {"escaped": True, "loot": "set"}
""",
    "setitem_on_alias": """
import collections
class M(collections.ChainMap):
    pass
def attack():
    alias = M[int]
    alias["key"] = 1
    return {"escaped": True, "loot": "setitem"}
""",
    "attribute_write_on_alias": """
def attack():
    alias = list[int]
    alias.append = 1
    return {"escaped": True, "loot": "written"}
""",
    "method_forwarding": """
class C:
    def m(self):
        return 1
def attack():
    return {"escaped": True, "loot": str(C().m.mro)}
""",
    "union_forwarding": """
def attack():
    return {"escaped": True, "loot": str((int | str).mro)}
""",
}


REGISTRY_PROBE = """
import collections
def registry(req):
    cls = collections.ChainMap
    return {"list": isinstance([], cls), "dict": isinstance({}, cls)}
"""


async def test_guards_refuse_what_forwarding_objects_reach(service: Service) -> None:
    for name, code in GUARD_ATTACKS.items():
        val = name.replace("_", "")
        await service.put_val(val, textwrap.dedent(code).replace("def attack", f"def {val}"))
    await service.put_val("registry", REGISTRY_PROBE)
    with trio.fail_after(90):
        for name in GUARD_ATTACKS:
            response = await service.api("POST", f"/v1/run/alice.{name.replace('_', '')}", json=[])
            error = json_error(response, 502, "val_error")
            assert "escaped" not in response.text, name
            refusals = ("not available to vals", "forward", "cannot be written", "refused")
            assert any(word in error["message"] for word in refusals), (name, error)
            # The process-wide ABC registry is untouched (a fresh worker of the same user).
            registry = await service.api("POST", "/v1/run/alice.registry", json=[None])
            assert registry.json() == {"list": False, "dict": False}, name
        await assert_recovers(service)


# In-process, for every forwarding type the standard library has: each one built to forward to
# what the guards protect, read and written through the real guards.


class _StrChainMap(str, collections.ChainMap):  # type: ignore[misc,type-arg]
    pass


class _Holder:
    def method(self) -> None:
        pass


def _codec_streams() -> dict[str, object]:
    reader, writer = codecs.getreader("utf-8"), codecs.getwriter("utf-8")
    encode, decode = codecs.getencoder("utf-8"), codecs.getdecoder("utf-8")
    return {
        "reader": reader(io.BytesIO(b"")),
        "writer": writer(io.BytesIO()),
        "both": codecs.StreamReaderWriter(io.BytesIO(), reader, writer),
        "recoder": codecs.StreamRecoder(io.BytesIO(), encode, decode, reader, writer),
    }


# (name, how to build it, an attribute that reaches what the guards protect)
FORWARDERS: list[tuple[str, Callable[[], object], str]] = [
    ("GenericAlias->str.format", lambda: types.GenericAlias(_StrChainMap, (int,)), "format"),
    ("GenericAlias->format_map", lambda: types.GenericAlias(_StrChainMap, ()), "format_map"),
    ("GenericAlias->mro", lambda: list[int], "mro"),
    ("GenericAlias->register", lambda: collections.ChainMap[str, int], "register"),
    ("CallableGenericAlias", lambda: collections.abc.Callable[[int], str], "mro"),
    ("typing.List", lambda: typing.List[int], "mro"),  # noqa: UP006
    ("typing.Dict", lambda: typing.Dict[str, int], "fromkeys"),  # noqa: UP006
    ("typing.Annotated->str", lambda: typing.Annotated[str, "x"], "format"),
    ("typing.Type", lambda: typing.Type[str], "mro"),  # noqa: UP006
    ("typing.Callable", lambda: typing.Callable[[int], str], "mro"),
    ("typing.Union", lambda: typing.Union[int, str], "copy_with"),  # noqa: UP007
    ("typing.Literal", lambda: typing.Literal["x"], "copy_with"),
    ("typing.Tuple", lambda: typing.Tuple[int, ...], "mro"),  # noqa: UP006
    ("typing.Unpack", lambda: typing.Unpack[typing.Tuple[int]], "copy_with"),  # noqa: UP006
    ("typing.MutableMapping", lambda: typing.MutableMapping[str, int], "register"),
    ("typing special form", lambda: typing.ClassVar, "mro"),
    ("types.UnionType", lambda: int | str, "mro"),
    ("weakref.proxy->str subclass", lambda: weakref.proxy(_StrChainMap), "format"),
    ("weakref.proxy->ABC", lambda: weakref.proxy(collections.ChainMap), "register"),
    ("weakref.proxy->callable", lambda: weakref.proxy(_Holder.method), "mro"),
    ("super->str", lambda: super(_StrChainMap, _StrChainMap("x")), "format"),
    ("bound method->function", lambda: _Holder().method, "mro"),
    ("codecs.StreamReader", lambda: _codec_streams()["reader"], "getvalue"),
    ("codecs.StreamWriter", lambda: _codec_streams()["writer"], "getvalue"),
    ("codecs.StreamReaderWriter", lambda: _codec_streams()["both"], "getvalue"),
    ("codecs.StreamRecoder", lambda: _codec_streams()["recoder"], "getvalue"),
    ("a Python __getattr__ wrapper", lambda: _Wrapper("{}"), "format"),
]


class _Wrapper:
    """As tempfile's and os.popen's file wrappers are: attributes from the wrapped object."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)


@pytest.mark.parametrize(("name", "build", "attribute"), FORWARDERS, ids=[f[0] for f in FORWARDERS])
def test_every_forwarding_type_gives_vals_no_attribute_and_no_write(
    name: str, build: Callable[[], object], attribute: str
) -> None:
    forwarder = build()
    assert forwards(type(forwarder)), name
    with pytest.raises(AttributeError, match="forward"):
        guarded_getattr(forwarder, attribute)
    assert guarded_getattr(forwarder, attribute, "default") == "default"
    namespace = make_globals("v", {}, LogBuffer(100))
    with pytest.raises(TypeError, match="cannot be written"):
        namespace["_write_"](forwarder)


@pytest.mark.parametrize(
    ("what", "value"),
    [
        ("str.format", str.format),
        ("str.format_map", str.format_map),
        ("bound format", "{}".format),
        ("bound format of a subclass", _StrChainMap("{}").format),
        ("type.mro", type.__dict__["mro"]),
        ("bound mro", list.mro),
        ("ABC register", collections.ChainMap.register),
        ("ABCMeta.register", abc.ABCMeta.register),
        ("with_traceback", ValueError().with_traceback),
        ("object", object),
        ("type", type),
        ("what a GenericAlias forwards to", types.GenericAlias(_StrChainMap, ()).format),
        ("what typing forwards to", typing.List[int].mro),  # noqa: UP006
    ],
)
def test_refusal_is_decided_on_what_the_attribute_resolves_to(what: str, value: object) -> None:
    # The second wall: were a forwarding type missed, what it hands back is still refused.
    assert refusal(value) is not None, what


@pytest.mark.parametrize("value", ["".upper, [].append, {}.get, len, Facade, str, _Holder().method])
def test_ordinary_attributes_are_not_refused(value: object) -> None:
    assert refusal(value) is None


# Found by scanning every standard library module for types whose attribute lookup is not the
# plain one (the C slot, read with ctypes: a Python-level hook and a C one look alike from
# Python). Those that do not forward to another object, and why they are harmless.
NOT_FORWARDING = {
    "builtins.module": "every module is refused whole by the getattr guard",
    "enum.EnumType": "its __getattr__ (3.11) answers only the enum's own members, by name",
    "builtins.instancemethod": "made only by C code (PyInstanceMethod_New), never reachable",
    "decimal.Context": "its C lookup answers its own `flags` and `traps`, nothing else's",
    "_thread._local": "its own per-thread attributes; no thread-local reaches a val",
    "asyncio.events.BaseDefaultEventLoopPolicy._Local": "a thread-local, as above",
    "asyncio.events._RunningLoop": "a thread-local, as above",
}

_SCAN = r"""
import contextlib, ctypes, importlib, io, sys, warnings
warnings.simplefilter("ignore")
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__",
        "lib2to3", "ensurepip", "pydoc_data", "pydoc"}
for name in sorted(sys.stdlib_module_names):
    if name in SKIP or name.startswith(("_test", "xx", "win", "_win", "msvc", "_msi", "nt")):
        continue
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module(name)
    except BaseException:
        pass
# tp_getattro is the 19th pointer of a PyTypeObject (CPython 3.11, Include/cpython/object.h).
OFFSET = 18 * ctypes.sizeof(ctypes.c_void_p)
def getattro(cls):
    return ctypes.c_void_p.from_address(id(cls) + OFFSET).value
plain = {getattro(object), getattro(type)}
assert getattro(list) == getattro(object) and getattro(type(list[int])) not in plain
seen, stack = set(), [object]
while stack:
    cls = stack.pop()
    if cls in seen:
        continue
    seen.add(cls)
    try:
        stack.extend(type.__subclasses__(cls))
    except TypeError:
        pass
for module in list(sys.modules.values()):
    seen.update(v for v in vars(module).values() if isinstance(v, type))
for cls in sorted(seen, key=lambda c: (c.__module__ or "", c.__qualname__)):
    root = (cls.__module__ or "").split(".")[0]
    if (root in sys.stdlib_module_names or root == "builtins") and getattro(cls) not in plain:
        print(f"{cls.__module__}.{cls.__qualname__}")
"""


def test_every_stdlib_type_whose_attribute_lookup_is_not_plain_is_refused() -> None:
    found = subprocess.run(
        [sys.executable, "-c", _SCAN], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert "types.GenericAlias" in found
    assert "typing._GenericAlias" in found
    unhandled = [name for name in found if name not in NOT_FORWARDING and not _refused(name)]
    assert unhandled == [], "types whose attribute lookup the guards do not know"
    assert all(forwards(kind) for kind in FORWARDING_TYPES)


def _refused(qualified: str) -> bool:
    """The stdlib class named `module.Qual.Name` is one the getattr guard calls forwarding."""
    if qualified == "builtins.method":
        return forwards(types.MethodType)
    module_name, _, qualname = qualified.rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # distutils, cgi, ...: deprecated, still scanned
        while module_name not in sys.modules:
            try:
                importlib.import_module(module_name)
            except ImportError:
                module_name, _, head = module_name.rpartition(".")
                qualname = f"{head}.{qualname}"
    found: object = sys.modules[module_name]
    for part in qualname.split("."):
        found = getattr(found, part)
    return isinstance(found, type) and forwards(found)


# --- No secret shared between tenants' workers -------------------------------------------------

PROBE = """
class Marker:
    pass
def probe(req):
    return {"hash": hash("valrun probe"), "address": repr(Marker()).rsplit(" ", 1)[-1]}
"""


async def probe(service: Service, user: str, val: str) -> dict[str, Any]:
    await service.put_val(val, PROBE.replace("def probe", f"def {val}"), user=user)
    response = await service.web(user, val)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_each_users_workers_have_their_own_hash_secret(service: Service) -> None:
    with trio.fail_after(40):
        alice = [await probe(service, "alice", name) for name in ("pa", "pb")]
        bob = [await probe(service, "bob", name) for name in ("pc", "pd")]
    # One user's workers share their fork server; another user's never do: neither the hash
    # secret (what a flood of colliding keys needs) nor the memory layout.
    assert alice[0]["hash"] == alice[1]["hash"]
    assert bob[0]["hash"] == bob[1]["hash"]
    assert bob[0]["hash"] != alice[0]["hash"]
    assert bob[0]["address"] != alice[0]["address"]


async def test_one_shared_fork_server_would_share_the_secret(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The same probe with one fork server for all: what the test above would see.
    config = Config(
        server=ServerConfig(bind=("127.0.0.1:0",)),
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'shared.db'}"),
        sandbox=SandboxConfig(fork_server_per_user=False),
    )
    store = Store(tmp_path / "shared.db")
    tokens = {name: store.create_user(name) for name in ("alice", "bob")}
    store.close()
    with trio.fail_after(40):
        urls: list[str] = await nursery.start(
            lambda task_status: serve_valrun(config, task_status=task_status)
        )
        port = int(urls[0].rpartition(":")[2])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            shared = Service(config, port, client, tokens, tmp_path / "shared.db")
            alice = await probe(shared, "alice", "sa")
            bob = await probe(shared, "bob", "sb")
    assert alice["hash"] == bob["hash"]


def spec(owner: str, val_id: int) -> ValSpec:
    code = PROBE.replace("def probe", "def p")
    return ValSpec(val_id, 1, owner, "p", code, (), f"{owner}-p.web.localhost")


async def probe_pool(pool: Pool, owner: str, val_id: int) -> dict[str, Any]:
    reply = await pool.invoke(spec(owner, val_id), HttpRequest(0, "GET", "/", "/", "", ()))
    assert isinstance(reply.outcome, ValResponse), reply.outcome
    result: dict[str, Any] = json.loads(reply.outcome.body)
    return result


async def test_a_killed_users_fork_server_restarts_without_touching_others() -> None:
    with trio.fail_after(40):
        async with open_pool(Config(limits=LimitsConfig(wall_time_s=5.0))) as pool:
            assert pool.tenants is not None
            assert pool.fork_server is None
            bob = await probe_pool(pool, "bob", 1)
            alice = await probe_pool(pool, "alice", 2)
            fork_server = pool.tenants.fork_server("alice")
            assert fork_server is not None
            assert fork_server.server is not None
            os.kill(fork_server.server.process.pid, signal.SIGKILL)
            await fork_server.server.gone.wait()
            # Her spare, forked before, outlives its fork server (workers are tethered to the
            # front end, not to it) and is still hers; the next cold start needs a new one.
            await probe_pool(pool, "alice", 3)
            again = await probe_pool(pool, "alice", 4)
            assert fork_server.restarts == 1
            assert again["hash"] != alice["hash"]  # a new process, a new secret
            # Bob's worker, of bob's fork server, never noticed.
            assert (await probe_pool(pool, "bob", 1))["hash"] == bob["hash"]
            assert pool.tenants.stats["fork_servers_started"] == 2


async def test_query_headers_and_form_fields_are_bounded(service: Service) -> None:
    code = (
        "def fields(req):\n"
        "    return {'q': len(req.query.items()), 'h': len(req.headers.items()),\n"
        "            'f': len(req.form().items()) if req.method == 'POST' else 0}\n"
    )
    await service.put_val("fields", code)
    limit = service.config.limits.max_request_fields
    form = {"content-type": "application/x-www-form-urlencoded"}
    with trio.fail_after(30):
        ok = await service.web("alice", "fields", "/?" + "&".join(f"k{i}=1" for i in range(limit)))
        assert ok.status_code == 200
        assert ok.json()["q"] == limit
        # Colliding or not, what a request could make the val hash is bounded.
        for query in ("&".join(f"k{i}=1" for i in range(limit + 1)), "&" * limit, "a=1;" * 5000):
            response = await service.web("alice", "fields", "/?" + query)
            if response.status_code == 200:  # `;` is no separator: one field
                assert response.json()["q"] <= limit
            else:
                assert (
                    "limits.max_request_fields"
                    in json_error(response, 400, "too_many_fields")["message"]
                )
        many = [(f"x-h{i}", "1") for i in range(service.config.limits.max_request_headers + 1)]
        response = await service.web("alice", "fields", headers=dict(many))
        error = json_error(response, 431, "headers_too_large")
        assert f"at most {service.config.limits.max_request_headers}" in error["message"]
        body = "&".join(f"f{i}=1" for i in range(limit + 1))
        response = await service.web("alice", "fields", method="POST", content=body, headers=form)
        json_error(response, 400, "too_many_fields")
        # Without the form content type the front end cannot know: the worker refuses it in
        # `req.form()`, as the val's error, and lives on.
        response = await service.web("alice", "fields", method="POST", content=body)
        assert "limits.max_request_fields" in json_error(response, 502, "val_error")["message"]
        ok = await service.web("alice", "fields", method="POST", content="a=1&b=2", headers=form)
        assert ok.json()["f"] == 2
        await assert_recovers(service)


async def test_json_object_keys_are_bounded(service: Service) -> None:
    code = "def keys(req):\n    return {'n': len(req.json())}\ndef count(d):\n    return len(d)\n"
    await service.put_val("keys", code)
    await service.put_val("count", "def count(d):\n    return len(d)\n")
    limits = service.config.limits
    wide = {f"k{i}": i for i in range(limits.max_json_object_keys + 1)}
    many = [{f"k{i}": i for i in range(900)} for _ in range(limits.max_json_keys // 900 + 1)]
    with trio.fail_after(30):
        for args in ([wide], [many]):
            response = await service.api("POST", "/v1/run/alice.count", json=args)
            assert "limits.max_json" in json_error(response, 400, "too_many_fields")["message"]
        fine = {f"k{i}": i for i in range(limits.max_json_object_keys)}
        response = await service.api("POST", "/v1/run/alice.count", json=[fine])
        assert response.status_code == 200
        assert response.json() == len(fine)
        response = await service.web("alice", "keys", method="POST", json=wide)
        assert "limits.max_json_object_keys" in json_error(response, 502, "val_error")["message"]
        response = await service.web("alice", "keys", method="POST", json=fine)
        assert response.json() == {"n": len(fine)}
        await assert_recovers(service)


# --- Replies judged right -----------------------------------------------------------------------

# One val, one worker (max_workers_per_val=1): after each hostile reply the counter goes on
# from where it was, which only the same worker can do.
REPLIES = """
import json
n = 0
def replies(req):
    global n
    n += 1
    mode = req.query.get("mode")
    if mode == "surrogate_message":
        raise ValueError("bad \\ud800 value \\udfff")
    if mode == "surrogate_header":
        return Response("x", headers={"x-bad": "a\\ud800b"})
    if mode == "surrogate_header_name":
        return Response("x", headers={"x-\\udc80": "v"})
    if mode == "surrogate_body":
        return "text \\ud800"
    if mode == "huge_message":
        raise ValueError("m" * 3_000_000)
    if mode == "huge_message_of_surrogates":
        raise ValueError("\\ud800" * 600_000)
    if mode == "many_headers":
        return Response("x", headers=[("x-h", "v" * 10) for _ in range(100_000)])
    if mode == "header_over_head_limit":
        return Response("x", headers={"x-big": "v" * 2_000_000})
    if mode == "header_surrogates_over_limit":
        return Response("x", headers={"x-big": "\\ud800" * 300_000})
    if mode == "deep_json":
        deep = []
        for _ in range(900):
            deep = [deep]
        return deep
    if mode == "too_deep_json":
        deep = []
        for _ in range(100_000):
            deep = [deep]
        return deep
    if mode == "huge_log":
        print("\\ud800" * 200_000)
        raise ValueError("after a big log")
    return {"n": n}
"""


@pytest.mark.parametrize(
    ("mode", "status", "error_type"),
    [
        ("surrogate_message", 502, "val_error"),
        ("surrogate_header", 502, "bad_response"),
        ("surrogate_header_name", 502, "bad_response"),
        ("surrogate_body", 502, "val_error"),
        ("huge_message", 502, "val_error"),
        ("huge_message_of_surrogates", 502, "val_error"),
        ("many_headers", 502, "response_too_large"),
        ("header_over_head_limit", 502, "response_too_large"),
        ("header_surrogates_over_limit", 502, "response_too_large"),
        ("too_deep_json", 502, "val_error"),
        ("huge_log", 502, "val_error"),
    ],
)
async def test_a_hostile_reply_is_the_vals_error_and_the_worker_lives(
    start_service: StartService, mode: str, status: int, error_type: str
) -> None:
    service = await start_service(max_workers_per_val=1)
    await service.put_val("replies", REPLIES)
    with trio.fail_after(60):
        first = await service.web("alice", "replies")
        assert first.json() == {"n": 1}
        response = await service.web("alice", "replies", f"/?mode={mode}")
        error = json_error(response, status, error_type)
        assert len(error["message"]) <= 4096
        after = await service.web("alice", "replies")
        assert after.json() == {"n": 3}, "the worker died"
        record = await latest_record(service, "replies")
        assert record["status"] == 200
        await assert_recovers(service)


async def test_deep_result_through_run_is_the_vals_error(start_service: StartService) -> None:
    service = await start_service(max_workers_per_val=1)
    code = REPLIES.replace("def replies(req):", "def replies(mode):").replace(
        'req.query.get("mode")', "mode"
    )
    await service.put_val("replies", code)
    with trio.fail_after(30):
        response = await service.api("POST", "/v1/run/alice.replies", json=["too_deep_json"])
        assert "RecursionError" in json_error(response, 502, "val_error")["message"]
        response = await service.api("POST", "/v1/run/alice.replies", json=["count"])
        assert response.json() == {"n": 2}


@pytest.mark.parametrize(
    "body",
    [
        b'["\\ud800"]',
        b'["x\\udfffy"]',
        b'{"args": [{"k": "\\udbff"}]}',
        b'[{"\\ud800": 1}]',
        b'["\\ude00\\ud83d"]',  # a pair in the wrong order is two lone ones
        b"[1e400]",
        b"[-1e400]",
        b'{"args": [[[1e999]]]}',
        b"[123e500]",
    ],
)
async def test_client_json_the_val_could_not_see_as_sent_is_a_400(
    service: Service, body: bytes
) -> None:
    await service.put_val("echo", "def echo(*args):\n    return list(args)\n")
    with trio.fail_after(20):
        response = await service.api("POST", "/v1/run/alice.echo", content=body)
        error = json_error(response, 400, "bad_json")
        assert "surrogate" in error["message"] or "too large" in error["message"]
        if body.startswith(b"["):
            eval_body = b'{"code": "lambda *a: 1", "args": ' + body + b"}"
            response = await service.api("POST", "/v1/eval", content=eval_body)
            json_error(response, 400, "bad_json")
        # Saving code that is not text is a 400 too, not a 500.
        put = await service.api(
            "PUT",
            "/v1/vals/alice/echo",
            content=b'{"code": "x = \\"\\ud800\\""}',
            headers={"content-type": "application/json"},
        )
        json_error(put, 400, "bad_json")
        fine = await service.api("POST", "/v1/run/alice.echo", content=b'["\\ud83d\\ude00", 1e308]')
        assert fine.status_code == 200
        assert fine.json() == ["\U0001f600", 1e308]
