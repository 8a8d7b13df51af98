"""Attacks on the facades and features added for issue 13 (functools, operator, enum, csv,
io, statistics, textwrap, typing, zoneinfo, str.format), each through the real server.

The same rules as tests/test_attacks.py: each case is one technique, named after it, with the
outcome the sandbox must produce; a val that escapes returns `{"escaped": True, ...}`, which no
outcome accepts; after each case a normal val must still answer. A refusal may come at save
(400 `bad_code`, the check compiles the code and its imports) or when the val runs (502).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from runtime.hosts import VAL_RE
from tests.attack_kit import (
    ATTACK_LIMITS,
    ATTACK_POOL,
    METHOD_FORWARDING,
    UNDERSCORE,
    Attack,
    Compile,
    RunningService,
    Runtime,
    assert_no_loot,
    assert_service_recovers,
    attack,
    check_outcome,
    running_service,
    save,
)

RESTRICTED = "is a restricted name"

FUNCTOOLS = [
    attack(
        "functools_partial_of_open",
        Runtime("name 'open' is not defined"),
        """
        import functools
        def attack(req):
            return {"escaped": True, "loot": functools.partial(open, "/etc/hostname")().read()}
        """,
    ),
    attack(
        "functools_partial_of_getattr_reads_frames",
        Runtime(RESTRICTED),
        """
        import functools
        def attack(req):
            frame = functools.partial(getattr, (x for x in [1]), "gi_frame")()
            return {"escaped": True, "loot": repr(frame.f_globals)}
        """,
    ),
    attack(
        "functools_reduce_walks_dunders_with_getattr",
        Runtime(UNDERSCORE),
        """
        import functools
        def attack(req):
            base = functools.reduce(getattr, ["__class__", "__base__"], 1)
            return {"escaped": True, "loot": repr(base)}
        """,
    ),
    attack(
        "functools_partial_of_unbound_str_format",
        Runtime(UNDERSCORE),
        """
        import functools
        def attack(req):
            walk = functools.partial(str.format, "{0.__class__.__base__.__subclasses__}")
            return {"escaped": True, "loot": walk(req)}
        """,
    ),
    attack(
        "functools_partial_func_is_only_what_was_given",
        Runtime("nothing but the val's own function"),
        """
        import functools
        def mine(x):
            return x
        def attack(req):
            p = functools.partial(mine, 1)
            if p.func is mine and p.args == (1,) and p.keywords == {}:
                return {"escaped": False, "why": "nothing but the val's own function"}
            return {"escaped": True, "loot": repr(p.func)}
        """,
    ),
    attack(
        "functools_lru_cache_wrapped_attribute",
        Compile(UNDERSCORE),
        """
        import functools
        def attack(req):
            return {"escaped": True, "loot": repr(functools.lru_cache(abs).__wrapped__)}
        """,
    ),
    attack(
        "functools_lru_cache_wrapped_through_getattr",
        Runtime(UNDERSCORE),
        """
        import functools
        @functools.lru_cache(maxsize=2)
        def cached(x):
            return x
        def attack(req):
            inner = getattr(cached, "__wrapped__")
            return {"escaped": True, "loot": repr(getattr(inner, "__globals__"))}
        """,
    ),
    attack(
        "functools_cache_info_class_walk",
        Runtime(UNDERSCORE),
        """
        import functools
        @functools.lru_cache(maxsize=2)
        def cached(x):
            return x
        def attack(req):
            info = cached.cache_info()
            return {"escaped": True, "loot": repr(getattr(info, "__class__"))}
        """,
    ),
    attack(
        "functools_wraps_copies_past_the_write_guard",
        Runtime("has no attribute 'wraps'"),
        """
        import functools
        def attack(req):
            functools.wraps(req)
            return {"escaped": True}
        """,
    ),
    attack(
        "functools_singledispatch_evals_annotations",
        Runtime("has no attribute 'singledispatch'"),
        """
        import functools
        def attack(req):
            functools.singledispatch(abs)
            return {"escaped": True}
        """,
    ),
]

OPERATOR = [
    attack(
        "operator_attrgetter_class",
        Runtime("has no attribute 'attrgetter'"),
        """
        import operator
        def attack(req):
            return {"escaped": True, "loot": repr(operator.attrgetter("__class__")(req))}
        """,
    ),
    attack(
        "operator_attrgetter_imported_by_name",
        Runtime("cannot import 'attrgetter' from 'operator'"),
        """
        from operator import attrgetter
        def attack(req):
            return {"escaped": True, "loot": repr(attrgetter("__class__.__base__")(req))}
        """,
    ),
    attack(
        "operator_methodcaller_subclasses",
        Runtime("has no attribute 'methodcaller'"),
        """
        import operator
        def attack(req):
            return {"escaped": True, "loot": operator.methodcaller("__subclasses__")(object)}
        """,
    ),
    attack(
        "operator_setitem_past_the_write_guard",
        Runtime("has no attribute 'setitem'"),
        """
        import operator
        def attack(req):
            operator.setitem(env, "K", "v")
            return {"escaped": True}
        """,
    ),
    attack(
        "operator_call_of_guarded_getattr",
        Runtime(UNDERSCORE),
        """
        import operator
        def attack(req):
            return {"escaped": True, "loot": repr(operator.call(getattr, 1, "__class__"))}
        """,
    ),
    attack(
        "operator_itemgetter_on_env_reads_only_the_env",
        Runtime("itemgetter reads items only"),
        """
        import operator
        def attack(req):
            try:
                operator.itemgetter("__builtins__")(env)
            except KeyError:
                return {"escaped": False, "why": "itemgetter reads items only"}
            return {"escaped": True}
        """,
    ),
]

DATACLASSES_ENUM_TYPING = [
    attack(
        "dataclasses_import",
        Runtime("import of 'dataclasses' is not allowed"),
        """
        import dataclasses
        def attack(req):
            return {"escaped": True, "loot": repr(dataclasses.fields)}
        """,
    ),
    attack(
        "dataclass_fields_attribute",
        Runtime(UNDERSCORE),
        """
        import collections
        Point = collections.namedtuple("Point", "x y")
        def attack(req):
            return {"escaped": True, "loot": repr(getattr(Point, "__dataclass_fields__"))}
        """,
    ),
    attack(
        "enum_metaclass_through_getattr",
        Runtime(UNDERSCORE),
        """
        import enum
        class Color(enum.Enum):
            RED = 1
        def attack(req):
            meta = getattr(Color, "__class__")
            return {"escaped": True, "loot": repr(meta)}
        """,
    ),
    attack(
        "enum_member_map",
        Compile(UNDERSCORE),
        """
        import enum
        Color = enum.Enum("Color", "RED GREEN")
        def attack(req):
            return {"escaped": True, "loot": repr(Color._member_map_)}
        """,
    ),
    attack(
        "enum_mro_walk_to_object",
        Runtime("'mro' is not available to vals"),
        """
        import enum
        class Color(enum.Enum):
            RED = 1
        def attack(req):
            return {"escaped": True, "loot": repr(Color.mro()[-1])}
        """,
    ),
    attack(
        "enum_global_enum_writes_into_a_module",
        Runtime("has no attribute 'global_enum'"),
        """
        import enum
        def attack(req):
            enum.global_enum(enum.Enum("E", "A", module="os"))
            return {"escaped": True}
        """,
    ),
    attack(
        "enum_module_globals",
        Runtime("has no attribute 'sys'"),
        """
        import enum
        def attack(req):
            return {"escaped": True, "loot": repr(enum.sys.modules)}
        """,
    ),
    attack(
        "enum_class_with_its_own_metaclass",
        Compile('The keyword argument "metaclass" is not allowed'),
        """
        import enum
        class Color(enum.Enum, metaclass=enum.Enum):
            RED = 1
        def attack(req):
            return {"escaped": True}
        """,
    ),
    attack(
        "typing_get_type_hints_evals_strings",
        Runtime("has no attribute 'get_type_hints'"),
        """
        import typing
        def target(x: "().__class__.__base__.__subclasses__()"):
            pass
        def attack(req):
            return {"escaped": True, "loot": repr(typing.get_type_hints(target))}
        """,
    ),
    attack(
        "typing_forward_ref_evaluates",
        Runtime("has no attribute 'ForwardRef'"),
        """
        import typing
        def attack(req):
            return {"escaped": True, "loot": repr(typing.ForwardRef("open"))}
        """,
    ),
]

CSV_IO_TEXT = [
    attack(
        "csv_dialect_object_class_walk",
        Runtime(UNDERSCORE),
        """
        import csv
        def attack(req):
            dialect = csv.reader(["a,b"]).dialect
            return {"escaped": True, "loot": repr(getattr(dialect, "__class__"))}
        """,
    ),
    attack(
        "csv_dialect_class_is_read_only",
        Runtime("attribute-less object (assign or del)"),
        """
        import csv
        def attack(req):
            csv.excel.delimiter = ";"
            return {"escaped": True}
        """,
    ),
    attack(
        "csv_register_dialect_changes_process_tables",
        Runtime("has no attribute 'register_dialect'"),
        """
        import csv
        def attack(req):
            csv.register_dialect("x", delimiter=";")
            return {"escaped": True}
        """,
    ),
    attack(
        "csv_field_size_limit",
        Runtime("has no attribute 'field_size_limit'"),
        """
        import csv
        def attack(req):
            csv.field_size_limit(1)
            return {"escaped": True}
        """,
    ),
    attack(
        "csv_module_re",
        Runtime("has no attribute 're'"),
        """
        import csv
        def attack(req):
            return {"escaped": True, "loot": repr(csv.re.enum.sys)}
        """,
    ),
    attack(
        "io_open",
        Runtime("has no attribute 'open'"),
        """
        import io
        def attack(req):
            return {"escaped": True, "loot": io.open("/etc/hostname").read()}
        """,
    ),
    attack(
        "io_stringio_slots",
        Runtime(UNDERSCORE),
        """
        import io
        def attack(req):
            return {"escaped": True, "loot": repr(getattr(io.StringIO("x"), "_text"))}
        """,
    ),
    attack(
        "textwrap_wrapper_class_table",
        Runtime("has no attribute 'TextWrapper'"),
        """
        import textwrap
        def attack(req):
            textwrap.TextWrapper.unicode_whitespace_trans[32] = "x"
            return {"escaped": True}
        """,
    ),
    attack(
        "statistics_module_sys",
        Runtime("has no attribute 'sys'"),
        """
        import statistics
        def attack(req):
            return {"escaped": True, "loot": repr(statistics.sys.modules)}
        """,
    ),
    attack(
        "strptime_module_import",
        Compile('"_strptime" is an invalid variable name'),
        """
        import _strptime
        def attack(req):
            return {"escaped": True, "loot": repr(_strptime)}
        """,
    ),
]

ZONEINFO = [
    attack(
        "zoneinfo_key_path_traversal",
        Runtime("ValueError"),
        """
        import zoneinfo
        def attack(req):
            return {"escaped": True, "loot": repr(zoneinfo.ZoneInfo("../../../etc/hostname"))}
        """,
    ),
    attack(
        "zoneinfo_absolute_key",
        Runtime("ValueError"),
        """
        import zoneinfo
        def attack(req):
            return {"escaped": True, "loot": repr(zoneinfo.ZoneInfo.no_cache("/etc/passwd"))}
        """,
    ),
    attack(
        "zoneinfo_file_path_attribute",
        Compile(UNDERSCORE),
        """
        import zoneinfo
        def attack(req):
            return {"escaped": True, "loot": zoneinfo.ZoneInfo("UTC")._file_path}
        """,
    ),
]

FORMAT = [
    attack(
        "format_field_class_walk",
        Runtime(UNDERSCORE),
        """
        def attack(req):
            return {"escaped": True, "loot": "{0.__class__.__base__.__subclasses__}".format(1)}
        """,
    ),
    attack(
        "format_field_function_globals",
        Runtime(METHOD_FORWARDING),
        """
        def attack(req):
            return {"escaped": True, "loot": "{r.text.__globals__}".format(r=req)}
        """,
    ),
    attack(
        "format_map_field_walk",
        Runtime(METHOD_FORWARDING),
        """
        def attack(req):
            return {"escaped": True, "loot": "{r.json.__globals__}".format_map({"r": req})}
        """,
    ),
    attack(
        "format_field_generator_frame",
        Runtime(RESTRICTED),
        """
        def attack(req):
            return {"escaped": True, "loot": "{0.gi_frame.f_globals}".format(x for x in [1])}
        """,
    ),
    attack(
        "format_unbound_from_the_str_class",
        Runtime(METHOD_FORWARDING),
        """
        def attack(req):
            fmt = str.format
            return {"escaped": True, "loot": fmt("{0.text.__globals__}", req)}
        """,
    ),
    attack(
        "format_on_a_str_subclass",
        Runtime(UNDERSCORE),
        """
        class Template(str):
            pass
        def attack(req):
            return {"escaped": True, "loot": Template("{0.__class__}").format(req)}
        """,
    ),
    attack(
        "format_item_key_is_not_an_attribute",
        Runtime("KeyError"),
        """
        def attack(req):
            return {"escaped": True, "loot": "{0[__globals__]}".format({})}
        """,
    ),
    attack(
        "format_nested_spec_walk",
        Runtime(UNDERSCORE),
        """
        def attack(req):
            return {"escaped": True, "loot": "{0:{1.__class__}}".format(1, 2)}
        """,
    ),
    attack(
        "string_formatter_class",
        Runtime("has no attribute 'Formatter'"),
        """
        import string
        def attack(req):
            return {"escaped": True, "loot": string.Formatter().format("{0.__class__}", 1)}
        """,
    ),
]

ATTACKS = FUNCTOOLS + OPERATOR + DATACLASSES_ENUM_TYPING + CSV_IO_TEXT + ZONEINFO + FORMAT


@pytest.fixture(scope="module")
def facade_attack_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    db_path = tmp_path_factory.mktemp("facade-attacks") / "v.db"
    with running_service(ATTACK_LIMITS, db_path, ATTACK_POOL) as running:
        yield running


def test_attack_names_are_unique_val_names() -> None:
    names = [case.name for case in ATTACKS]
    assert len(set(names)) == len(names)
    assert all(VAL_RE.fullmatch(name) for name in names), names


@pytest.mark.parametrize("case", ATTACKS, ids=[case.name for case in ATTACKS])
async def test_facade_attack_is_refused_and_the_pool_recovers(
    case: Attack, facade_attack_service: RunningService
) -> None:
    async with facade_attack_service.connect() as service:
        source = f"{case.source}\n{case.name} = attack\n"
        saved = await save(service, case.name, source)
        try:
            with trio.fail_after(30):
                if saved.status_code == 400:
                    assert isinstance(case.outcome, Compile | Runtime), saved.text
                    # Refused at save, with the refusal the load would have given.
                    error = saved.json()["error"]
                    assert error["type"] == "bad_code", error
                    problems = [problem["message"] for problem in error["problems"]]
                    assert any(case.outcome.fragment in p for p in problems), error
                else:
                    assert saved.status_code == 201, saved.text
                    response = await service.web("alice", case.name)
                    check_outcome(response, case.outcome)
                    assert_no_loot(response)
                await assert_service_recovers(service)
        finally:
            await service.api("DELETE", f"/v1/vals/alice/{case.name}")
