"""Vals importing vals (docs/imports.md, docs/contract.md §16): who may import what, latest and
pinned versions, freshness of warm importers, cycles, depth and size limits, a dependency that
raises, the checks at save, and attacks on the import path.

The pure part (the worker's importer, with a table of answers in place of the front end) runs
in this process; everything else goes through the real server, real workers and a real
SQLite file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from runtime.errors import HTTPError
from runtime.imports import Imports, missing
from runtime.pool import Pool, ValSpec, open_pool
from runtime.store import AsyncStore, Store, ValVersion
from sandbox.check import check_source
from sandbox.errors import ValError
from sandbox.facades import ValModule
from sandbox.imports import MAX_BATCH, ValImporter, ValPath, parse_path
from sandbox.limits import WorkerLimits
from sandbox.messages import LOAD_ASK_ID, ImportAnswer, ImportAsk, M, MessageError, parse
from sandbox.policy import LogBuffer, guarded_getattr, load_val, run_module
from sandbox.wire import Frame
from tests.helpers import (
    HOSTILE_CONFIG,
    HOSTILE_SPEC,
    HOSTILE_WORKER,
    Service,
    StartService,
    configured_service,
    hostile_ok,
    hostile_request,
)

LIB = "def double(x):\n    return 2 * x\n\nscale = 10\nlib = 'helpers'\n"


def library(name: str, lib: str = "helpers") -> str:
    """A library val: the helpers, and its own name (every val exports that)."""
    return LIB.replace("'helpers'", repr(lib)) + f"{name} = 'library'\n"


# --- the worker's side, pure: a table of vals answers its asks ---------------------------------


Key = tuple[str, str, int | None]
MAIN = ValPath("alice", "main", None)


class Answers:
    """The front end's answers, from a table of `(user, val, version) -> source`."""

    def __init__(self, vals: Mapping[Key, str]) -> None:
        self.vals = vals
        self.asked: list[ImportAsk] = []
        self.batches: list[int] = []

    def __call__(self, ask: ImportAsk, answer: type[M], /) -> M:
        self.asked.append(ask)
        source = self.vals.get((ask.user, ask.val.lower(), ask.version))
        if source is None:
            reply = ImportAnswer(ask.id, error=f"no val {ask.user}/{ask.val}")
        else:
            reply = ImportAnswer(ask.id, ask.user, ask.val, ask.version or 7, source.encode())
        return parse(reply.to_frame(), answer)

    def ask_all(self, asks: Sequence[ImportAsk], answer: type[M], /) -> list[M]:
        self.batches.append(len(asks))
        return [self(ask, answer) for ask in asks]


def importer(
    vals: Mapping[Key, str],
    env: Mapping[str, str] | None = None,
    top: ValPath | None = MAIN,
    **limits: int,
) -> tuple[ValImporter, Answers, LogBuffer]:
    answers = Answers(vals)
    log = LogBuffer(4096)

    def run(
        source: str, filename: str, module_name: str, hook: Any, prefetch: Any
    ) -> tuple[dict[str, object], dict[str, object]]:
        return run_module(source, filename, module_name, env or {}, log, {}, hook, prefetch)

    imp = ValImporter(answers, run, WorkerLimits(**limits), top, answers.ask_all)
    return imp, answers, log


def load(
    source: str, imp: ValImporter, name: str = "main", env: dict[str, str] | None = None
) -> Any:
    log = LogBuffer(4096)
    return load_val(source, name, env or {}, log, {}, imp.module_hook(), imp.prefetch).export


def test_import_forms_bind_the_exports() -> None:
    imp, answers, _ = importer(
        {("bob", "util", None): LIB, ("bob", "util", 1): "lib = 1\nold = 'v1'\n"}
    )
    main = load(
        "from vals.bob.util import double, scale\n"
        "import vals.bob.util as u\n"
        "import vals.bob.util\n"
        "from vals.bob.util.v1 import old\n"
        "import vals.bob.util.v1 as first\n"
        "main = [double(scale), u.double(2), vals.bob.util.scale, old, first.old]\n",
        imp,
    )
    assert main == [20, 4, 10, "v1", "v1"]
    # Once per worker: latest and v1 are asked for once each, whatever the number of imports.
    assert [(a.user, a.val, a.version, a.id) for a in answers.asked] == [
        ("bob", "util", None, LOAD_ASK_ID),
        ("bob", "util", 1, LOAD_ASK_ID),
    ]


def test_a_modules_top_level_imports_are_asked_for_in_one_batch() -> None:
    """One wait for the front end per module, not one per import: the names come from the
    compiled code before it runs; imports inside functions are asked for when they run."""
    vals: dict[Key, str] = {(u, v, None): "x = 1\n" for u, v in [("bob", "a"), ("bob", "b")]}
    vals[("carol", "c", None)] = "from vals.bob.a import x\nfrom vals.bob.b import x\nc = 1\n"
    vals[("carol", "lazy", None)] = "x = 2\n"
    imp, answers, _ = importer(vals)
    main = load(
        "from vals.carol.c import c\nimport vals.bob.a as a\n"
        "def main():\n    from vals.carol.lazy import x\n    return x\n",
        imp,
    )
    # The top module: carol/c and bob/a together; carol/c's own: bob/b alone (bob/a is known).
    assert answers.batches == [2]
    assert [a.val for a in answers.asked] == ["c", "a", "b"]
    assert main() == 2
    assert [a.val for a in answers.asked] == ["c", "a", "b", "lazy"]


def test_a_batch_holds_at_most_max_batch_asks() -> None:
    names = [f"v{i}" for i in range(MAX_BATCH + 3)]
    vals: dict[Key, str] = {("bob", name, None): "x = 1\n" for name in names}
    imp, answers, _ = importer(vals)
    load("".join(f"from vals.bob.{name} import x\n" for name in names) + "main = x\n", imp)
    assert answers.batches == [MAX_BATCH, 3]


def test_a_module_runs_once_per_worker_and_its_state_is_shared() -> None:
    counter = (
        "count = 0\ndef bump():\n    global count\n    count += 1\n    return count\ncounter = 1\n"
    )
    imp, _, log = importer({("bob", "counter", None): counter + "print('loaded')\n"})
    first = load("from vals.bob.counter import bump\nmain = bump", imp)
    second = load("import vals.bob.counter as c\nmain = c", imp)
    assert (first(), first()) == (1, 2)
    assert second.count == 2  # read live: the rebinding by `global` shows
    assert log.take() == "loaded\n"


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("import vals\n", "names no val"),
        ("from vals import bob\n", "names no val"),
        ("import vals.bob\n", "names no val"),
        ("from vals.bob.util.v0 import lib\n", "names no version of bob/util"),
        ("from vals.bob.util.latest import lib\n", "names no version"),
        ("import vals.bob.util.v1.lib\n", "names no val"),
        ("from vals.bob.util import nothing\n", "cannot import 'nothing' from <val bob/util>"),
        ("from vals.bob.util import env\n", "cannot import 'env'"),
        ("from vals.bob.util import Response\n", "cannot import 'Response'"),
        ("from vals.bob.missing import lib\n", "no val bob/missing"),
        # Lookalikes: a Cyrillic letter names no val (names are ASCII), uppercase users neither.
        ("from vals.bob.util\u0456 import lib\n", "no val bob/util\u0456"),
        ("from vals.Bob.util import lib\n", "no val Bob/util"),
    ],
)
def test_import_refusals_say_why(source: str, fragment: str) -> None:
    imp, _, _ = importer({("bob", "util", None): LIB})
    with pytest.raises(ImportError) as caught:
        load(source + "main = 1\n", imp)
    assert fragment in str(caught.value)


def test_an_imported_val_exposes_no_underscore_names_nor_its_namespace() -> None:
    imp, _, _ = importer({("bob", "util", None): LIB})
    module = imp.load(ValPath("bob", "util", None))
    assert isinstance(module, ValModule)
    for name in ("_namespace", "_hidden", "__dict__", "__class__", "_print_", "_getattr_", "env"):
        with pytest.raises(AttributeError):
            guarded_getattr(module, name)
    with pytest.raises(AttributeError, match="read-only"):
        module.scale = 1
    assert repr(module) == "<val bob/util>"
    assert dir(module) == ["double", "lib", "scale"]
    with pytest.raises(AttributeError, match="read-only"):
        del module.scale
    # In a val, the compiler refuses the `_` names outright, and getattr refuses them too.
    for attack in ("u.__dict__", "u._namespace", "u.__class__"):
        with pytest.raises(ValError, match="starts with"):
            load(f"import vals.bob.util as u\nmain = {attack}\n", imp)
    with pytest.raises(AttributeError):
        load("import vals.bob.util as u\nmain = getattr(u, '_namespace')\n", imp)


def test_the_dependency_sees_the_importers_env_not_its_owners() -> None:
    leak = "def read():\n    return env.get('TOKEN')\nleak = 1\n"
    imp, _, _ = importer({("bob", "leak", None): leak}, env={"TOKEN": "alice's"})
    main = load("from vals.bob.leak import read\nmain = read", imp, env={"TOKEN": "alice's"})
    assert main() == "alice's"


def test_a_cycle_is_refused_with_the_chain() -> None:
    vals: dict[Key, str] = {
        ("bob", "b", None): "from vals.carol.c import c\nb = 1\n",
        ("carol", "c", None): "from vals.alice.main import x\nc = 1\n",
    }
    imp, _, _ = importer(vals)
    with pytest.raises(ImportError) as caught:
        load("from vals.bob.b import b\nmain = b\n", imp)
    assert "import cycle: alice/main -> bob/b -> carol/c -> alice/main" in str(caught.value)


def test_a_chain_deeper_than_the_limit_is_refused() -> None:
    vals: dict[Key, str] = {
        ("bob", f"d{i}", None): f"from vals.bob.d{i + 1} import x\nx = 1\n" for i in range(5)
    }
    vals[("bob", "d5", None)] = "x = 1\n"
    imp, _, _ = importer(vals, max_import_depth=3)
    with pytest.raises(ImportError, match=r"deeper than limits.max_import_depth \(3\)"):
        load("from vals.bob.d0 import x\nmain = x\n", imp)
    imp, _, _ = importer(vals, max_import_depth=6)
    assert load("from vals.bob.d0 import x\nmain = x\n", imp) == 1


def test_imported_source_is_bounded_per_worker() -> None:
    big = "x = 1\n" + "# padding\n" * 200
    vals: dict[Key, str] = {("bob", f"big{i}", None): big for i in range(3)}
    imp, _, _ = importer(vals, max_import_bytes=len(big) * 2 + 10)
    load("from vals.bob.big0 import x\nfrom vals.bob.big1 import x\nmain = x\n", imp)
    with pytest.raises(ImportError, match=r"past limits\.max_import_bytes"):
        load("from vals.bob.big2 import x\nmain = x\n", imp)


def test_a_dependency_that_raises_at_load_is_named_with_its_line() -> None:
    imp, _, _ = importer({("bob", "broken", None): "x = 1\n\ny = {}['missing']\nbroken = 1\n"})
    with pytest.raises(ImportError) as caught:
        load("from vals.bob.broken import x\nmain = x\n", imp)
    assert str(caught.value) == "bob/broken raised while loading at line 3: KeyError: 'missing'"


def test_a_dependency_that_does_not_compile_is_named() -> None:
    imp, _, _ = importer({("bob", "bad", None): "def f(:\n"})
    with pytest.raises(ImportError, match="bob/bad does not load"):
        load("from vals.bob.bad import f\nmain = f\n", imp)


def test_the_refusal_for_a_missing_val_names_only_what_was_asked() -> None:
    assert missing(ImportAsk(1, "bob", "x", 2)) == "no val bob/x version 2"
    assert missing(ImportAsk(1, "bob", "x")) == "no val bob/x"


def test_parse_path_table() -> None:
    assert parse_path("vals.bob.util") == ValPath("bob", "util", None)
    assert parse_path("vals.bob.Util.v12") == ValPath("bob", "Util", 12)
    assert parse_path("vals.bob.v3") == ValPath("bob", "v3", None)  # a val named v3
    assert (
        parse_path("vals.bob.util.v1234567890")
        == "'vals.bob.util.v1234567890' names no version of bob/util: pin one as vals.bob.util.v3"
    )


# --- the checks at save, pure: names the missing val or export --------------------------------


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        (
            "from vals.bob.util import nope\nmain = 1\n",
            1,
            "cannot import 'nope' from bob/util: it exports double, lib, scale",
        ),
        ("x = 1\nimport vals.bob.gone as g\nmain = 1\n", 2, "no val bob/gone"),
        ("def main():\n    from vals.bob.gone import f\n", 2, "no val bob/gone"),
        (
            "from vals.bob.chain import x\nmain = 1\n",
            1,
            "bob/chain imports bob/gone: no val bob/gone",
        ),
        (
            "from vals.bob.cyc import x\nmain = 1\n",
            1,
            "import cycle: alice/main -> bob/cyc -> alice/main",
        ),
        ("import vals.bob\nmain = 1\n", 1, "'vals.bob' names no val: import another val as"),
    ],
)
def test_save_check_names_the_missing_val_or_export(source: str, line: int, message: str) -> None:
    vals: dict[Key, str] = {
        ("bob", "util", None): LIB,
        ("bob", "chain", None): "from vals.bob.gone import y\nx = 1\n",
        ("bob", "cyc", None): "from vals.alice.main import main\nx = 1\n",
    }
    imp, _, _ = importer(vals)
    problems = check_source(source, "main", 262144, {}, imp)
    assert [p.line for p in problems] == [line]
    assert problems[0].message.startswith(message)


def test_save_check_reads_each_val_of_a_diamond_once() -> None:
    """Twelve levels of diamonds (2**12 paths to the bottom) are checked in one read each."""
    vals: dict[Key, str] = {("bob", "d12", None): "x = 1\n"}
    for level in range(12):
        for side in ("a", "b"):
            vals[("bob", f"d{level}{side}", None)] = f"from vals.bob.d{level + 1}a import x\n" + (
                f"from vals.bob.d{level + 1}b import x\n" if level < 11 else ""
            )
    vals[("bob", "d11a", None)] = vals[("bob", "d11b", None)] = "from vals.bob.d12 import x\n"
    imp, answers, _ = importer(vals, max_import_depth=20)
    source = "from vals.bob.d0a import x\nfrom vals.bob.d0b import x\nmain = 1\n"
    assert check_source(source, "main", 262144, {}, imp) == []
    assert len(answers.asked) == len({(a.user, a.val) for a in answers.asked}) == 25


def test_save_check_finds_a_chain_too_deep_through_a_val_it_already_followed() -> None:
    vals: dict[Key, str] = {
        ("bob", "x", None): "from vals.bob.y import y\nx = 1\n",
        ("bob", "y", None): "y = 1\n",
        ("bob", "a", None): "from vals.bob.x import x\na = 1\n",
    }
    imp, _, _ = importer(vals, max_import_depth=2)
    source = "from vals.bob.x import x\nfrom vals.bob.a import a\nmain = 1\n"
    problems = check_source(source, "main", 262144, {}, imp)
    assert [p.line for p in problems] == [2]
    assert problems[0].message.startswith("imports nest deeper than limits.max_import_depth (2)")


def test_save_check_passes_good_imports_and_global_exports() -> None:
    vals: dict[Key, str] = {
        ("bob", "util", None): LIB + "def setup():\n    global late\n    late = 1\n"
    }
    imp, _, _ = importer(vals)
    source = "from vals.bob.util import double, late\nimport vals.bob.util as u\nmain = 1\n"
    assert check_source(source, "main", 262144, {}, imp) == []


# --- the wire messages -------------------------------------------------------------------------


def test_import_messages_round_trip_and_refuse_garbage() -> None:
    ask = ImportAsk(3, "bob", "util", 2)
    assert parse(ask.to_frame(), ImportAsk) == ask
    answer = ImportAnswer(3, "bob", "util", 2, b"x = 1\n")
    assert parse(answer.to_frame(), ImportAnswer) == answer
    bad: list[dict[str, object]] = [
        {"op": "import", "id": 1, "user": "bob", "val": "u", "version": 0},
        {"op": "import", "id": 1, "user": "bob", "val": "u", "version": "1"},
        {"op": "import", "id": 1, "user": 5, "val": "u"},
        {"op": "import_answer", "id": 1, "owner": "b", "name": "u", "version": 0, "error": None},
        {"op": "import_answer", "id": 1, "owner": "b", "name": "u", "version": 2, "error": "x"},
        {"op": "import_answer", "id": 1, "owner": "b", "name": "u", "version": 1, "error": 1},
    ]
    for head in bad:
        with pytest.raises(MessageError):
            parse(Frame(head), ImportAsk, ImportAnswer)


# --- the front end's answer: as the worker's user, whatever the worker says -------------------


def spec_of(owner: str) -> ValSpec:
    return ValSpec(1, 1, owner, "main", "", (), "")


# --- the pool: asks while a module loads, from a worker that may lie ----------------------------


@pytest.mark.parametrize("kind", ["fetch", "wrong-id", "malformed", "unanswered"])
async def test_while_loading_only_an_import_ask_is_answered(kind: str) -> None:
    spec = replace(HOSTILE_SPEC, val_id=5, code=f"load-ask:{kind}")
    with trio.fail_after(20):
        async with open_pool(HOSTILE_CONFIG, worker_command=HOSTILE_WORKER) as pool:
            # "unanswered": a well-formed import ask, but nothing answers imports here.
            with pytest.raises(HTTPError) as caught:
                await pool.invoke(spec, hostile_request("/ok"))
            assert (caught.value.status, caught.value.type) == (502, "protocol_error")
            assert await hostile_ok(pool) == b"ok"  # the pool goes on


async def test_an_import_ask_while_loading_is_answered_as_the_workers_user() -> None:
    asked: list[tuple[str, ImportAsk]] = []

    async def broker(spec: ValSpec, ask: Any) -> Frame:
        asked.append((spec.owner, ask))
        return ImportAnswer(ask.id, "bob", "util", 3, b"lib = 1\n").to_frame()

    spec = replace(HOSTILE_SPEC, code="load-ask:ok")
    with trio.fail_after(20):
        async with open_pool(HOSTILE_CONFIG, worker_command=HOSTILE_WORKER) as pool:
            pool.broker = broker
            reply = await pool.invoke(spec, hostile_request("/ok"))
    assert asked == [("alice", ImportAsk(LOAD_ASK_ID, "bob", "util"))]
    head = json.loads(reply.log)
    assert (head["op"], head["owner"], head["version"]) == ("import_answer", "bob", 3)


async def test_an_import_answered_across_a_change_retires_the_importers() -> None:
    """The store read the old version; the change's retirement ran before the import was
    noted. The handler sees `val_changes` moved and retires the val's importers again."""

    class Racing:
        def __init__(self, pool: _RecordingPool) -> None:
            self.pool = pool

        async def resolve(self, owner: str, name: str, version: int | None) -> Any:
            self.pool.val_changes += 1  # a change lands while the store is read
            val = ValVersion(9, owner, name, "public", 1, "lib = 1\n", 0.0)
            return (val, {})

    pool = _RecordingPool()
    handler = Imports(cast(AsyncStore, Racing(pool)), cast(Pool, pool))
    answer = await handler.answer(spec_of("alice"), ImportAsk(2, "bob", "util"))
    assert answer.version == 1
    assert pool.events == [("note", 9), ("retire", 9)]
    pool.events.clear()
    await handler.answer(spec_of("alice"), ImportAsk(2, "bob", "util", 1))  # pinned
    assert pool.events == []


class _RecordingPool:
    def __init__(self) -> None:
        self.val_changes = 0
        self.events: list[tuple[str, int]] = []

    def note_import(self, spec: ValSpec, val_id: int) -> None:
        self.events.append(("note", val_id))

    def retire_importers_of(self, val_id: int) -> None:
        self.events.append(("retire", val_id))


# --- through the real server -------------------------------------------------------------------


async def run(service: Service, user: str, val: str, *, as_user: str | None = None) -> Any:
    return await service.api("POST", f"/v1/run/{user}.{val}", user=as_user, json={"args": []})


async def put(service: Service, user: str, name: str, code: str, privacy: str = "public") -> Any:
    return await service.api(
        "PUT", f"/v1/vals/{user}/{name}", user=user, json={"code": code, "privacy": privacy}
    )


def importer_code(name: str, target: str) -> str:
    return f"def {name}():\n    from vals.{target} import lib\n    return lib\n"


@pytest.mark.parametrize(
    ("owner", "privacy", "allowed"),
    [
        ("alice", "public", True),
        ("alice", "unlisted", True),
        ("alice", "private", True),  # one's own
        ("bob", "public", True),
        ("bob", "unlisted", True),
        ("bob", "private", False),  # another's: "no val", as for a val that does not exist
    ],
)
async def test_who_may_import_what(
    service: Service, owner: str, privacy: str, allowed: bool
) -> None:
    assert (await put(service, owner, "dep", library("dep"), privacy)).status_code == 201
    saved = await put(service, "alice", "main", importer_code("main", f"{owner}.dep"))
    evaluated = await service.api(
        "POST", "/v1/eval", user="alice", json={"code": f"from vals.{owner}.dep import lib\nlib"}
    )
    if allowed:
        assert saved.status_code == 201, saved.text
        assert (await run(service, "alice", "main")).json() == "helpers"
        assert evaluated.json() == "helpers"
    else:
        assert saved.status_code == 400
        assert saved.json()["error"]["message"] == "the code was not saved: line 2: no val bob/dep"
        assert evaluated.status_code == 502
        assert "ImportError: no val bob/dep" in evaluated.json()["error"]["message"]


async def test_private_and_missing_cannot_be_told_apart(service: Service) -> None:
    """The probe: the same import, of a private val of bob's and then of no val at all, gets
    byte-identical answers: at save, from Eval, and from a val that imports at request time."""
    await put(service, "bob", "secret", library("secret"), "private")
    probes = {
        "save": ("PUT", "/v1/vals/alice/probe", {"code": importer_code("probe", "bob.secret")}),
        "eval": ("POST", "/v1/eval", {"code": "from vals.bob.secret import lib\nlib"}),
    }

    async def answers() -> list[tuple[int, bytes]]:
        seen = []
        for method, path, body in probes.values():
            response = await service.api(method, path, user="alice", json=body)
            seen.append((response.status_code, response.content))
        # A val saved before (its import is at request time, of a public helper made private
        # or deleted later).
        response = await run(service, "alice", "late")
        seen.append((response.status_code, response.content))
        return seen

    await put(service, "bob", "helper", library("helper"))
    await put(service, "alice", "late", importer_code("late", "bob.helper"))
    await service.api("PATCH", "/v1/vals/bob/helper", user="bob", json={"privacy": "private"})
    private = await answers()
    await service.api("DELETE", "/v1/vals/bob/secret", user="bob")
    await service.api("DELETE", "/v1/vals/bob/helper", user="bob")
    deleted = await answers()
    assert private == deleted
    assert [status for status, _ in private] == [400, 502, 502]


async def test_anonymous_eval_imports_public_and_unlisted_only(tmp_path: Path) -> None:
    async with configured_service(tmp_path, server={"anonymous_eval": True}) as service:
        for privacy in ("public", "unlisted", "private"):
            await put(service, "alice", privacy, library(privacy, "ok"), privacy)
        answers = {}
        for privacy in ("public", "unlisted", "private"):
            code = f"from vals.alice.{privacy} import lib\nlib"
            response = await service.api("POST", "/v1/eval", user=None, json={"code": code})
            answers[privacy] = response.json()
        assert answers["public"] == answers["unlisted"] == "ok"
        assert "ImportError: no val alice/private" in answers["private"]["error"]["message"]


async def test_latest_follows_new_versions_and_pinned_stays(service: Service) -> None:
    await put(service, "bob", "dep", library("dep", "one"))
    await put(service, "bob", "dep", library("dep", "two"))
    code = (
        "from vals.bob.dep import lib as latest\n"
        "from vals.bob.dep.v1 import lib as first\n"
        "def main(req):\n    return {'latest': latest, 'first': first}\n"
    )
    await put(service, "alice", "main", code)
    assert (await service.web("alice", "main")).json() == {"latest": "two", "first": "one"}
    # The next request after a new version of the dependency sees it (its warm worker retired).
    await put(service, "bob", "dep", library("dep", "three"))
    with trio.fail_after(20):
        assert (await service.web("alice", "main")).json() == {"latest": "three", "first": "one"}
    # Made private: importers get the import's error on their next request.
    await service.api("PATCH", "/v1/vals/bob/dep", user="bob", json={"privacy": "private"})
    assert (await service.web("alice", "main")).status_code == 502
    assert "ImportError: no val bob/dep" in await last_error(service, "alice", "main")
    # Public again, then deleted: the error again.
    await service.api("PATCH", "/v1/vals/bob/dep", user="bob", json={"privacy": "public"})
    assert (await service.web("alice", "main")).json()["latest"] == "three"
    await service.api("DELETE", "/v1/vals/bob/dep", user="bob")
    assert (await service.web("alice", "main")).status_code == 502
    assert "ImportError: no val bob/dep" in await last_error(service, "alice", "main")


async def last_error(service: Service, user: str, val: str) -> str:
    """The error message of the val's newest invocation record, as its owner reads it."""
    with trio.fail_after(20):
        while True:  # records are written in batches: wait for this one
            runs = await service.api("GET", f"/v1/vals/{user}/{val}/runs?limit=1", user=user)
            newest = runs.json()["runs"][0]
            if newest["error"] is not None:
                return str(newest["error"]["message"])
            await trio.sleep(0.05)


async def test_a_transitive_dependency_change_reaches_the_top(service: Service) -> None:
    await put(service, "bob", "base", library("base", "a"))
    await put(service, "bob", "mid", "from vals.bob.base import lib\nmid = 1\n")
    await put(
        service, "alice", "top", "from vals.bob.mid import lib\ndef top(req):\n    return lib\n"
    )
    assert (await service.web("alice", "top")).text == "a"
    await put(service, "bob", "base", library("base", "b"))
    assert (await service.web("alice", "top")).text == "b"


async def test_dependency_raising_at_load_names_it_and_its_line(service: Service) -> None:
    await put(service, "bob", "fragile", library("fragile"))
    await put(
        service, "alice", "main", "from vals.bob.fragile import lib\ndef main():\n    return lib\n"
    )
    # A later version that raises at load (saving checks the code, not what it does when run).
    await put(service, "bob", "fragile", "lib = 1\nboom = 1 // 0\nfragile = 1\n")
    response = await run(service, "alice", "main", as_user="alice")
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "bob/fragile raised while loading at line 2: ZeroDivisionError" in message
    assert message.endswith("(line 1, in <module>)")  # and where the importer imported it


async def test_a_dependency_raising_at_call_time_shows_its_frame(service: Service) -> None:
    await put(service, "bob", "thrower", "def boom():\n    raise ValueError('no')\nthrower = 1\n")
    await put(
        service,
        "alice",
        "main",
        "from vals.bob.thrower import boom\ndef main():\n    return boom()\n",
    )
    error = (await run(service, "alice", "main", as_user="alice")).json()["error"]
    assert error["message"] == "ValueError: no (bob/thrower line 2, in boom)"
    assert error["traceback"] == ["line 3, in main", "bob/thrower line 2, in boom"]


async def test_a_cycle_made_behind_the_checks_is_refused_at_load(service: Service) -> None:
    await put(service, "bob", "b", "b = 1\n")
    await put(service, "alice", "a", "from vals.bob.b import b\ndef a():\n    return b\n")
    refused = await put(service, "bob", "b", "from vals.alice.a import a\nb = 1\n")
    assert refused.json()["error"]["message"] == (
        "the code was not saved: line 1: import cycle: bob/b -> alice/a -> bob/b"
    )
    # Written past the checks (as an older valrun, or a direct write, might have).
    store = Store(service.db_path)
    store.put_val("bob", "b", "from vals.alice.a import a\nb = 1\n", None)
    store.close()
    await service.api("PUT", "/v1/env/NUDGE", user="alice", content=b"1")  # empties the cache
    response = await run(service, "alice", "a", as_user="alice")
    assert response.status_code == 502
    assert "import cycle: alice/a -> bob/b -> alice/a" in response.json()["error"]["message"]


async def test_a_chain_past_the_depth_limit(start_service: StartService) -> None:
    service = await start_service(max_import_depth=2)
    await put(service, "bob", "c0", "c0 = 1\n")
    for i in (1, 2):
        assert (
            await put(
                service, "bob", f"c{i}", f"from vals.bob.c{i - 1} import c{i - 1}\nc{i} = 1\n"
            )
        ).status_code == 201
    refused = await put(service, "bob", "c3", "from vals.bob.c2 import c2\nc3 = 1\n")
    assert refused.status_code == 400
    assert (
        "deeper than limits.max_import_depth (2): bob/c3 -> bob/c2 -> bob/c1 -> bob/c0"
        in refused.text
    )
    evaluated = await service.api(
        "POST", "/v1/eval", user="alice", json={"code": "from vals.bob.c2 import c2\nc2"}
    )
    assert evaluated.status_code == 502
    assert "deeper than limits.max_import_depth (2)" in evaluated.text


async def test_an_import_cannot_reach_another_tenants_env(service: Service) -> None:
    await service.api("PUT", "/v1/env/TOKEN", user="bob", content=b"bob-secret-value")
    await service.api("PUT", "/v1/env/TOKEN", user="alice", content=b"alice-secret-value")
    await put(service, "bob", "reader", "def read():\n    return env.get('TOKEN')\nreader = 1\n")
    await put(
        service,
        "alice",
        "main",
        "import vals.bob.reader as r\ndef main():\n    return [r.read(), hasattr(r, 'env')]\n",
    )
    body = (await run(service, "alice", "main", as_user="alice")).text
    assert "bob-secret-value" not in body
    assert json.loads(body) == ["alice-secret-value", False]


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        ("import vals.bob.util.__class__ as c\nc", "names no version of bob/util"),
        ("import vals\nvals.__dict__", '"__dict__" is an invalid attribute name'),
        ("from vals.bob.util import _x\n_x", '"_x" is an invalid variable name'),
        ("from vals.bob.util import __builtins__ as b\nb", '"__builtins__" is an invalid'),
        ("import vals.bob.util as u\nu._namespace", '"_namespace" is an invalid attribute'),
        ("import vals.bob.util as u\ngetattr(u, '_namespace')", "_namespace"),
        ("import vals.bob.util as u\ngetattr(u.double, '__globals__')", "__globals__"),
        ("import vals.bob.util as u\nu.env", "the val bob/util exports no 'env'"),
        ("import vals.bob.util as u\nu.Response", "exports no 'Response'"),
        ("import vals.bob.util as u\n[k for k in u]", "not iterable"),
        ("from vals.bob.secret import lib\nlib", "ImportError: no val bob/secret"),
        ("from vals.bob.util.v1.lib import x\nx", "'vals.bob.util.v1.lib' names no val"),
        ("from vals.bob.util import double\ndouble.__globals__", '"__globals__" is an invalid'),
        ("from vals..bob.util import lib\nlib", "SyntaxError"),
        ("from vals.bob.\u0443til import lib\nlib", "ImportError: no val bob/\u0443til"),
        ("from vals.b\u043eb.util import lib\nlib", "ImportError: no val b\u043eb/util"),
    ],
)
async def test_import_path_attacks_are_refused(service: Service, code: str, refusal: str) -> None:
    await put(service, "bob", "util", library("util"))
    await put(service, "bob", "secret", library("secret", "bob private code"), "private")
    response = await service.api("POST", "/v1/eval", user="alice", json={"code": code})
    assert response.status_code == 502, response.text
    assert refusal in response.json()["error"]["message"]
    assert "bob private code" not in response.text
    # The service goes on.
    fine = {"code": "from vals.bob.util import lib\nlib"}
    assert (await service.api("POST", "/v1/eval", user="alice", json=fine)).json() == "helpers"


async def test_a_public_val_importing_its_owners_private_val_is_for_its_owner_only(
    service: Service,
) -> None:
    """Imports of imports are resolved as the worker's user: bob's worker may not reach
    alice's private helper through alice's public val."""
    await put(service, "alice", "helper", library("helper", "alice private"), "private")
    await put(service, "alice", "front", "from vals.alice.helper import lib\nfront = lib\n")
    assert (await run(service, "alice", "front")).json() == "alice private"  # alice's worker
    code = {"code": "from vals.alice.front import front\nfront"}
    response = await service.api("POST", "/v1/eval", user="bob", json=code)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "alice/front raised while loading at line 1: ImportError: no val alice/helper" in message
    assert "alice private" not in response.text


async def test_a_hostile_worker_asking_for_anothers_private_val_gets_no_val(
    service: Service,
) -> None:
    """The front end decides who imports from the worker's user, never from what the worker
    says: an ask for bob's private val from alice's worker is refused as a missing val."""
    await put(service, "bob", "secret", library("secret"), "private")
    handler = Imports(AsyncStore(Store(service.db_path)), cast(Pool, _NullPool()))
    refused = await handler.answer(spec_of("alice"), ImportAsk(4, "bob", "secret"))
    assert refused == ImportAnswer(4, error="no val bob/secret")
    allowed = await handler.answer(spec_of("bob"), ImportAsk(4, "bob", "secret"))
    assert allowed.version == 1
    assert allowed.source == library("secret")
    for user, val in [("bob", "../secret"), ("BOB", "secret"), ("bob", "secret\n")]:
        answer = await handler.answer(spec_of("bob"), ImportAsk(4, user, val))
        assert answer.error == f"no val {user}/{val}"


class _NullPool:
    val_changes = 0

    def note_import(self, spec: ValSpec, val_id: int) -> None:
        pass

    def retire_importers_of(self, val_id: int) -> None:
        pass
