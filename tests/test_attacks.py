"""The attack suite (issue 4): vals that try to escape, each run through the real server.

Every case in `ATTACKS` is one technique, named after it, with the outcome the sandbox must
produce. Sources are written as the exploit would be: where the technique works, the val
returns `{"escaped": True, "loot": ...}` (the contents of /etc/hostname, a real module, a host
dict), which no outcome accepts, so the test fails when the attack succeeds. After each case
the service must still answer a normal val (the pool recovered).

Outcomes:
- `Compile`: RestrictedPython (or Python's compiler, inside the worker) refuses the source:
  502 `val_error` naming the refusal, and no line of the val ever ran.
- `Runtime`: a guard, a facade or a missing builtin refuses while the val runs: 502 with the
  refusal in the message, or 200 `{"escaped": False, "why": ...}` where the val proves it
  got nothing.
- `Limit`: a resource limit stops it: 504 `timeout`, 502 `memory_limit`, `cpu_limit`,
  `response_too_large`, `bad_response`, or `worker_crashed` when the OS stops the process.

Count by outcome: `python -m tests.test_attacks`, or
`collections.Counter(type(a.outcome).__name__ for a in ATTACKS)`.

The other groups (between vals, headers, the Eval API) are ordinary tests further down.
Cases share two servers per module (one with a short wall clock for the timeout cases), so the
file runs in well under a minute; each case saves its own val and deletes it afterwards.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator

import h11
import pytest
import trio

from runtime.hosts import VAL_RE
from tests.attack_kit import (
    ATTACK_LIMITS,
    ATTACK_POOL,
    METHOD_FORWARDING,
    SLEEPER_LIMITS,
    SLEEPER_POOL,
    UNDERSCORE,
    Attack,
    Compile,
    Limit,
    RunningService,
    Runtime,
    as_owner_if_load_failed,
    assert_no_loot,
    assert_service_recovers,
    attack,
    check_outcome,
    json_error,
    running_service,
    save,
)

# str.format and format_map read fields through the policy's guarded getattr (sandbox/shims.py):
# a walk through `_` names is refused as `x.__class__` in code is.
STR_FORMAT = UNDERSCORE
THIEF = """
class Thief:
    # RestrictedPython lets vals define __eq__; a comparison that declines (NotImplemented)
    # calls it reflected, with the other side's real object.
    def __eq__(self, other):
        self.loot = other
        return True
"""

# --- RestrictedPython's public CVE classes ---------------------------------------------------

CVE_CLASSES = [
    attack(
        "cve_2023_37271_generator_frame_globals",
        Compile('"gi_frame" is a restricted name'),
        """
        def attack(req):
            frame = (x for x in [1]).gi_frame.f_back
            return frame.f_globals["__builtins__"]["open"]("/etc/hostname").read()
        """,
    ),
    attack(
        "cve_2023_37271_generator_frame_via_getattr",
        Runtime('"gi_frame" is a restricted name'),
        """
        def attack(req):
            frame = getattr(getattr((x for x in [1]), "gi_frame"), "f_back")
            return getattr(frame, "f_globals")["__builtins__"]["open"]("/etc/hostname").read()
        """,
    ),
    attack(
        "host_generator_frame_from_json_iterencode",
        Runtime('"gi_frame" is a restricted name'),
        """
        import json
        def attack(req):
            gen = json.JSONEncoder().iterencode({"a": 1})   # json's own Python generator
            host_globals = getattr(getattr(gen, "gi_frame"), "f_globals")
            return repr(host_globals["c_make_encoder"])
        """,
    ),
    attack(
        "generator_code_object",
        Runtime('"gi_code" is a restricted name'),
        """
        def attack(req):
            code = getattr((x for x in [1]), "gi_code")
            return {"escaped": True, "loot": repr(code)}
        """,
    ),
    attack(
        "generator_yieldfrom_reaches_inner_iterator",
        Runtime('"gi_yieldfrom" is a restricted name'),
        """
        import json
        def relay():
            yield from json.JSONEncoder().iterencode([1])
        def attack(req):
            gen = relay()
            next(gen)
            inner = getattr(gen, "gi_yieldfrom")
            return {"escaped": True, "loot": repr(getattr(inner, "gi_frame"))}
        """,
    ),
    attack(
        "async_def_coroutine_frame",
        Compile("AsyncFunctionDef statements are not allowed"),
        """
        async def inner():
            return 1
        def attack(req):
            return repr(inner().cr_frame.f_globals)
        """,
    ),
    attack(
        "async_generator_expression_in_plain_function",
        Runtime("__aiter__"),
        """
        def attack(req):
            agen = (x async for x in [1, 2])   # compiles inside a normal function
            return repr(getattr(agen, "ag_frame"))
        """,
    ),
    attack(
        "cve_2023_41039_str_format_attribute_walk",
        Runtime(STR_FORMAT),
        """
        def attack(req):
            return "{0.__class__.__base__.__subclasses__}".format(req)
        """,
    ),
    attack(
        "str_format_map_with_crafted_mapping",
        Runtime(METHOD_FORWARDING),
        """
        def attack(req):
            return "{r.text.__globals__}".format_map({"r": req})
        """,
    ),
    attack(
        "str_format_unbound_from_the_str_class",
        Runtime(METHOD_FORWARDING),
        """
        def attack(req):
            fmt = str.format
            return fmt("{0.text.__globals__}", req)
        """,
    ),
    attack(
        "str_subclass_format",
        Runtime(METHOD_FORWARDING),
        """
        class Template(str):
            pass
        def attack(req):
            return Template("{0.text.__globals__}").format(req)
        """,
    ),
    attack(
        "cve_2024_47532_attribute_error_obj",
        Runtime("'obj' is not available to vals"),
        """
        import string
        def attack(req):
            try:
                string.no_such_member
            except AttributeError as e:
                real = e.obj          # was the real `string` module
                return repr(real.sys.modules["os"])
        """,
    ),
    attack(
        "attribute_error_obj_via_getattr",
        Runtime("'obj' is not available to vals"),
        """
        def attack(req):
            try:
                req.no_such_member
            except AttributeError as e:
                return {"escaped": True, "loot": repr(getattr(e, "obj"))}
        """,
    ),
    attack(
        "cve_2025_22153_except_star_type_confusion",
        Compile("TryStar statements are not allowed"),
        """
        def attack(req):
            try:
                raise ValueError(1)
            except* ValueError as group:
                return repr(group)
        """,
    ),
    attack(
        "cve_2026_55830_positional_only_guard_shadowing",
        Compile('"_getattr_" is an invalid variable name'),
        """
        def unguarded(_getattr_, /, obj):
            return obj.format   # compiled to _getattr_(obj, "format"): the caller's function
        def attack(req):
            return unguarded(lambda o, n: 1, "{0.text.__globals__}")(req)
        """,
    ),
    attack(
        "cve_2026_76825_imported_string_formatter",
        Runtime("cannot import 'Formatter' from 'string'"),
        """
        from string import Formatter
        def attack(req):
            return Formatter().format("{0.text.__globals__}", req)
        """,
    ),
    attack(
        "string_formatter_as_facade_attribute",
        Runtime("valrun's 'string' has no attribute 'Formatter'"),
        """
        import string
        def attack(req):
            return repr(string.Formatter().get_field("0.text.__globals__", [req], {}))
        """,
    ),
    attack(
        "string_template_class_hooks",
        Runtime("cannot import 'Template' from 'string'"),
        """
        from string import Template
        def attack(req):
            return Template("$x").substitute(x=1)
        """,
    ),
    attack(
        "lying_str_subclass_as_attribute_name",
        Runtime("type(name) must be str"),
        """
        class Name(str):
            def startswith(self, prefix):   # RestrictedPython < 7.2 asked the name itself
                return False
        def attack(req):
            text = getattr(req, "text")
            return repr(getattr(text, Name("__globals__")))
        """,
    ),
]

# --- Rebinding the guards the compiled code calls ---------------------------------------------

GUARD_SHADOWING = [
    attack(
        "guard_shadowing_by_module_assignment",
        Compile('"_write_" is an invalid variable name'),
        """
        import json
        _write_ = lambda ob: ob          # unguarded writes: monkeypatch the host
        def attack(req):
            json.loads = attack
            return {"escaped": True, "loot": "patched json.loads"}
        """,
    ),
    attack(
        "guard_shadowing_by_walrus",
        Compile('"_write_" is an invalid variable name'),
        """
        import json
        def attack(req):
            (_write_ := lambda ob: ob)
            json.JSONEncoder.default = repr
            return {"escaped": True, "loot": "patched JSONEncoder"}
        """,
    ),
    attack(
        "guard_shadowing_by_import_alias",
        Compile('"_getiter_" is an invalid variable name'),
        """
        from itertools import repeat as _getiter_
        def attack(req):
            return [x for x in "x"]
        """,
    ),
    attack(
        "guard_shadowing_by_except_target",
        Compile('"_getattr_" is an invalid variable name'),
        """
        def attack(req):
            try:
                raise ValueError
            except ValueError as _getattr_:
                return req.text
        """,
    ),
    attack(
        "guard_shadowing_by_class_name",
        Compile('"_inplacevar_" is an invalid variable name'),
        """
        class _inplacevar_:
            pass
        def attack(req):
            x = 1
            x += 1
            return x
        """,
    ),
    attack(
        "metaclass_keyword",
        Compile('The keyword argument "metaclass" is not allowed'),
        """
        def meta(name, bases, namespace):
            return namespace           # the raw class namespace, hooks and all
        class Hooked(metaclass=meta):
            pass
        def attack(req):
            return {"escaped": True, "loot": repr(Hooked)}
        """,
    ),
    attack(
        "metaclass_smuggled_in_class_keywords",
        Runtime("class keywords were dropped"),
        """
        calls = []
        def meta(name, bases, namespace):
            calls.append(name)
            return namespace
        def attack(req):
            class Hooked(**{"metaclass": meta}):
                pass
            if calls:
                return {"escaped": True, "loot": "val metaclass ran"}
            return {"escaped": False, "why": "class keywords were dropped"}
        """,
    ),
    attack(
        "unicode_lookalike_dunder",
        Compile(f'"__class__" {UNDERSCORE}'),
        # Fullwidth low lines (U+FF3F): the parser's NFKC makes this `__class__`.
        """
        def attack(req):
            return repr(req._\uff3fclass\uff3f\uff3f)
        """,
    ),
]

# --- Subclass walks, globals and builtins ----------------------------------------------------

WALKS = [
    attack(
        "subclass_walk_from_tuple",
        Compile(f'"__class__" {UNDERSCORE}'),
        """
        def attack(req):
            for cls in ().__class__.__base__.__subclasses__():
                if cls.__name__ == "catch_warnings":
                    return cls()._module.__builtins__["open"]("/etc/hostname").read()
        """,
    ),
    attack(
        "subclass_walk_via_getattr_strings",
        Runtime(f'"__class__" {UNDERSCORE}'),
        """
        def attack(req):
            base = getattr(getattr((), "__class__"), "__base__")
            return [repr(c) for c in getattr(base, "__subclasses__")()]
        """,
    ),
    attack(
        "subclass_walk_via_mro",
        Runtime("'mro' is not available to vals"),
        """
        def attack(req):
            root = int.mro()[-1]
            return [repr(c) for c in getattr(root, "__subclasses__")()]
        """,
    ),
    attack(
        "function_globals",
        Compile(f'"__globals__" {UNDERSCORE}'),
        """
        def attack(req):
            return attack.__globals__["__builtins__"]["open"]("/etc/hostname").read()
        """,
    ),
    attack(
        "host_function_globals_via_getattr",
        Runtime(f'"__globals__" {UNDERSCORE}'),
        """
        import json
        def attack(req):
            host_globals = getattr(json.JSONDecoder.decode, "__globals__")
            return repr(host_globals["__builtins__"]["open"])
        """,
    ),
    attack(
        "host_property_getter_globals",
        Runtime(f'"__globals__" {UNDERSCORE}'),
        """
        def attack(req):
            getter = Request.method.fget      # a function of the host's sandbox.http
            return repr(getattr(getter, "__globals__")["__builtins__"])
        """,
    ),
    attack(
        "builtins_by_name",
        Compile('"__builtins__" is an invalid variable name'),
        """
        def attack(req):
            return __builtins__["open"]("/etc/hostname").read()
        """,
    ),
    attack(
        "dunder_import_call",
        Compile('"__import__" is an invalid variable name'),
        """
        def attack(req):
            return repr(__import__("os").environ)
        """,
    ),
    attack(
        "getattr_through_map",
        Runtime(f'"__globals__" {UNDERSCORE}'),
        """
        def attack(req):
            found = list(map(getattr, [attack], ["__globals__"]))
            return found[0]["__builtins__"]["open"]("/etc/hostname").read()
        """,
    ),
    attack(
        "getattr_default_hides_the_refusal",
        Runtime("getattr gave the default"),
        """
        def attack(req):
            leaked = getattr(attack, "__globals__", None)
            if leaked is not None:
                return {"escaped": True, "loot": repr(leaked["__builtins__"])}
            return {"escaped": False, "why": "getattr gave the default"}
        """,
    ),
    attack(
        "hasattr_side_channel",
        Runtime("hasattr says no to every private name"),
        """
        def attack(req):
            # A hasattr that answered from the object, not the guard, maps hidden attributes.
            probes = [hasattr(attack, "__globals__"), hasattr(req, "_body")]
            probes.append(hasattr(1, "__class__"))
            if any(probes):
                return {"escaped": True, "loot": probes}
            return {"escaped": False, "why": "hasattr says no to every private name"}
        """,
    ),
    attack(
        "random_reduce_reaches_a_constructor",
        Runtime(f'"__reduce__" {UNDERSCORE}'),
        """
        import random
        def attack(req):
            rebuild = getattr(random.Random(1), "__reduce__")()[0]
            return {"escaped": True, "loot": repr(rebuild)}
        """,
    ),
    attack(
        "traceback_frame_walk",
        Compile(f'"__traceback__" {UNDERSCORE}'),
        """
        def attack(req):
            try:
                1 / 0
            except ZeroDivisionError as e:
                return repr(e.__traceback__.tb_frame.f_back.f_globals)
        """,
    ),
    attack(
        "traceback_via_getattr",
        Runtime(f'"__traceback__" {UNDERSCORE}'),
        """
        import json
        def attack(req):
            try:
                json.loads("{")
            except ValueError as e:
                tb = getattr(e, "__traceback__")
                return repr(getattr(getattr(tb, "tb_frame"), "f_globals"))
        """,
    ),
    attack(
        "exception_with_traceback",
        Runtime("'with_traceback' is not available to vals"),
        """
        def attack(req):
            return {"escaped": True, "loot": repr(ValueError().with_traceback(None))}
        """,
    ),
    attack(
        "exception_context_chain",
        Runtime(f'"__context__" {UNDERSCORE}'),
        """
        import json
        def attack(req):
            try:
                json.loads("[1,")
            except ValueError as e:
                return {"escaped": True, "loot": repr(getattr(e, "__context__"))}
        """,
    ),
    attack(
        "request_private_slot",
        Compile(f'"_body" {UNDERSCORE}'),
        """
        def attack(req):
            return req._body
        """,
    ),
]

# --- Missing builtins -----------------------------------------------------------------------

BUILTINS = [
    attack(
        "open_builtin",
        Runtime("name 'open' is not defined"),
        """
        def attack(req):
            return open("/etc/hostname").read()
        """,
    ),
    attack(
        "exec_call",
        Compile("Exec calls are not allowed"),
        """
        def attack(req):
            exec("import os")
        """,
    ),
    attack(
        "eval_call",
        Compile("Eval calls are not allowed"),
        """
        def attack(req):
            return eval("open('/etc/hostname').read()")
        """,
    ),
    attack(
        "compile_builtin",
        Runtime("name 'compile' is not defined"),
        """
        def attack(req):
            return repr(compile("import os", "<x>", "exec"))
        """,
    ),
    attack(
        "type_call_builds_a_class_with_hooks",
        Runtime("name 'type' is not defined"),
        """
        def attack(req):
            return repr(type("X", (), {"__init_subclass__": classmethod(print)}))
        """,
    ),
    attack(
        "super_proxy",
        Runtime("name 'super' is not defined"),
        """
        class A:
            def hello(self):
                return 1
        class B(A):
            def hello(self):
                return super().hello()
        def attack(req):
            return {"escaped": True, "loot": B().hello()}
        """,
    ),
    attack(
        "vars_of_a_host_class",
        Runtime("name 'vars' is not defined"),
        """
        def attack(req):
            return repr(vars(Request))
        """,
    ),
    attack(
        "globals_builtin",
        Runtime("name 'globals' is not defined"),
        """
        def attack(req):
            return repr(globals()["__builtins__"])
        """,
    ),
    attack(
        "id_address_leak",
        Runtime("name 'id' is not defined"),
        """
        def attack(req):
            return {"escaped": True, "loot": id(req)}
        """,
    ),
    attack(
        "memoryview_over_the_request_body",
        Runtime("name 'memoryview' is not defined"),
        """
        def attack(req):
            return repr(memoryview(req.body).obj)
        """,
    ),
    attack(
        "print_to_a_file_object",
        Runtime("print(file=...) is not available"),
        """
        class Sink:
            def write(self, text):
                pass
        def attack(req):
            print("x", file=Sink())
            return {"escaped": True, "loot": "printed to a val object"}
        """,
    ),
    attack(
        "printed_reads_other_output",
        Runtime("printed is empty"),
        """
        def attack(req):
            print("mine")
            if printed:
                return {"escaped": True, "loot": printed}
            return {"escaped": False, "why": "printed is empty"}
        """,
    ),
    attack(
        "format_builtin_with_a_field_spec",
        Runtime("Invalid format specifier"),
        """
        def attack(req):
            return format(1, "{0.__class__}")
        """,
    ),
    attack(
        "fstring_attribute_field",
        Compile(f'"__class__" {UNDERSCORE}'),
        """
        def attack(req):
            return f"{req.__class__.__init__.__globals__}"
        """,
    ),
    attack(
        "fstring_conversion_with_crafted_spec",
        Runtime("Invalid format specifier"),
        """
        def attack(req):
            spec = "{0.__class__}"
            return f"{req!r:{spec}}"
        """,
    ),
]

# --- Imports and attribute walks from the facades --------------------------------------------

FACADE_NAMES = (
    "base64 collections datetime decimal hashlib hmac html itertools json math random re"
    " string time urllib uuid"
)
EXITS = (
    "sys os posix builtins enum functools codecs binascii types warnings abc copyreg io"
    " struct operator weakref select subprocess importlib decoder encoder scanner entities"
    " parser heapq bisect locale"
)

IMPORTS = [
    attack(
        "import_os",
        Runtime("import of 'os' is not allowed in a val"),
        """
        import os
        def attack(req):
            return os.environ
        """,
    ),
    attack(
        "import_builtins_module",
        Compile('"builtins" is a reserved name'),
        """
        import builtins
        def attack(req):
            return builtins.open("/etc/hostname").read()
        """,
    ),
    attack(
        "import_inside_a_function_at_call_time",
        Runtime("import of 'subprocess' is not allowed in a val"),
        """
        def attack(req):
            import subprocess
            return subprocess.check_output(["cat", "/etc/hostname"]).decode()
        """,
    ),
    attack(
        "import_submodule_of_an_allowed_module",
        Runtime("import of 'json.decoder' is not allowed in a val"),
        """
        import json.decoder
        def attack(req):
            return repr(json.decoder.c_scanstring)
        """,
    ),
    attack(
        "from_allowed_module_import_unlisted_name",
        Runtime("cannot import 'codecs' from 'json'"),
        """
        from json import codecs
        def attack(req):
            return codecs.open("/etc/hostname").read()
        """,
    ),
    attack(
        "star_import_of_a_facade",
        Compile('"*" imports are not allowed'),
        """
        from re import *
        def attack(req):
            return repr(enum)
        """,
    ),
    attack(
        "relative_import",
        Runtime("relative import of '' is not allowed"),
        """
        from . import secrets
        def attack(req):
            return secrets.token_hex()
        """,
    ),
    attack(
        "coroutine_via_the_types_module",
        Runtime("import of 'types' is not allowed in a val"),
        """
        import types
        @types.coroutine
        def inner():
            yield 1
        def attack(req):
            return repr(getattr(inner(), "cr_frame"))
        """,
    ),
    attack(
        "datetime_c_api_capsule",
        Runtime("valrun's 'datetime' has no attribute 'datetime_CAPI'"),
        """
        import datetime
        def attack(req):
            return {"escaped": True, "loot": repr(datetime.datetime_CAPI)}   # raw C pointers
        """,
    ),
    attack(
        "re_enum_sys_modules",
        Runtime("valrun's 're' has no attribute 'enum'"),
        """
        import re
        def attack(req):
            return repr(re.enum.sys.modules["os"].environ)
        """,
    ),
    attack(
        "json_codecs_open",
        Runtime("valrun's 'json' has no attribute 'codecs'"),
        """
        import json
        def attack(req):
            return json.codecs.open("/etc/hostname").read()
        """,
    ),
    attack(
        "datetime_sys_modules",
        Runtime("valrun's 'datetime' has no attribute 'sys'"),
        """
        import datetime
        def attack(req):
            return repr(datetime.sys.modules["os"])
        """,
    ),
    attack(
        "functools_update_wrapper_copies_globals",
        Runtime("valrun's 're' has no attribute 'functools'"),
        """
        import re
        def attack(req):
            # Copies a host function's __globals__ (real builtins) into the val's function.
            re.functools.update_wrapper(attack, re.compile, updated=("__globals__",))
            return repr(attack)
        """,
    ),
    attack(
        "attribute_walk_from_every_facade",
        Runtime("no facade has any of"),
        f"""
        import {", ".join(FACADE_NAMES.split())}
        import urllib.parse
        MODULES = [{", ".join(FACADE_NAMES.split())}, urllib.parse]
        EXITS = {EXITS.split()!r}
        def attack(req):
            found = []
            for module in MODULES:
                for name in EXITS:
                    value = getattr(module, name, None)
                    if value is not None:
                        found.append(repr(module) + "." + name + " = " + repr(value))
            if found:
                return {{"escaped": True, "loot": found}}
            return {{"escaped": False, "why": "no facade has any of " + " ".join(EXITS)}}
        """,
    ),
]

# --- Writes into the host, and library internals ---------------------------------------------

WRITES = [
    attack(
        "monkeypatch_a_facade_member",
        Runtime("attribute-less object"),
        """
        import json
        def attack(req):
            json.dumps = lambda *args, **kwargs: "patched"
            return {"escaped": True, "loot": json.dumps(1)}
        """,
    ),
    attack(
        "monkeypatch_a_host_class",
        Runtime("attribute-less object"),
        """
        import json
        def attack(req):
            # Every later json.dumps in the worker, the host's reply encoding included.
            json.JSONEncoder.default = lambda self, o: repr(o)
            return {"escaped": True, "loot": "patched JSONEncoder.default"}
        """,
    ),
    attack(
        "property_planted_on_a_host_class",
        Runtime("attribute-less object"),
        """
        def attack(req):
            setattr(Response, "body", property(lambda self: b"forged"))
            return {"escaped": True, "loot": "planted"}
        """,
    ),
    attack(
        "init_subclass_hook_via_setattr",
        Runtime("starts with '_': vals may not set or delete it"),
        """
        class Base:
            pass
        def attack(req):
            setattr(Base, "__init_subclass__", classmethod(print))
            return {"escaped": True, "loot": "hook planted"}
        """,
    ),
    attack(
        "response_subclass_overrides_what_worker_reads",
        Runtime("Response cannot be subclassed"),
        r"""
        class Sneaky(Response):
            # Read by the worker after the val returned, outside its error handling.
            def header_pairs(self):
                return [["x-injected", "a\r\nSet-Cookie: stolen=1"]]
        def attack(req):
            return Sneaky("x")
        """,
    ),
    attack(
        "status_switching_protocols",
        Runtime("Response status must be an int from 200 to 599"),
        """
        def attack(req):
            return Response("", 101, {"upgrade": "h2c", "connection": "upgrade"})
        """,
    ),
    attack(
        "body_on_a_status_that_has_none",
        # A proxy trusting the Content-Length of a 204 would read the next response as body.
        Runtime("a 204 response cannot have a body"),
        """
        def attack(req):
            return Response("HTTP/1.1 200 OK\\r\\ncontent-length: 6\\r\\n\\r\\nforged", 204)
        """,
    ),
    attack(
        "env_mappingproxy_reflected_eq",
        Runtime("object does not support item or slice assignment"),
        THIEF
        + """
def attack(req):
    thief = Thief()
    env == thief
    thief.loot["INJECTED"] = "x"     # the worker's env dict, if the comparison handed it over
    return {"escaped": True, "loot": sorted(env)}
""",
    ),
    attack(
        "env_view_mapping_attribute",
        Runtime("has no attribute 'mapping'"),
        THIEF
        + """
def attack(req):
    thief = Thief()
    env.keys().mapping == thief        # a dict view's mapping is a proxy of its dict
    thief.loot["INJECTED"] = "x"
    return {"escaped": True, "loot": sorted(env)}
""",
    ),
    attack(
        "inplace_operator_on_env",
        Runtime("unsupported operand type(s) for |="),
        """
        def attack(req):
            e = env
            e |= {"INJECTED": "x"}
            if env.get("INJECTED"):
                return {"escaped": True, "loot": "env changed"}
            return {"escaped": False, "why": "env unchanged"}
        """,
    ),
    attack(
        "re_cached_pattern_groupindex_via_reflected_eq",
        Runtime("groupindex is a copy"),
        THIEF
        + r"""
import re
def attack(req):
    thief = Thief()
    re.compile(r"(?P<user>\w+)").groupindex == thief
    thief.loot["user"] = 2           # re's process-wide cache entry, if not a copy
    if re.compile(r"(?P<user>\w+)").groupindex["user"] != 1:
        return {"escaped": True, "loot": "rewrote a cached pattern's groups"}
    return {"escaped": False, "why": "groupindex is a copy"}
""",
    ),
    attack(
        "abc_register_rewrites_host_isinstance",
        Runtime("'register' is not available to vals"),
        """
        import collections
        def attack(req):
            collections.ChainMap.register(list)   # isinstance([], Mapping) is now True, host-wide
            return {"escaped": True, "loot": "registered"}
        """,
    ),
    attack(
        "write_into_a_host_table",
        Runtime("object does not support item or slice assignment"),
        """
        import decimal
        def attack(req):
            decimal.getcontext().traps[decimal.Inexact] = True
            return {"escaped": True, "loot": "wrote the worker's decimal context"}
        """,
    ),
    attack(
        "write_into_facade_tables",
        Runtime("facade tables are frozen"),
        """
        import decimal, hashlib, time, urllib.parse
        def add_algorithm():
            hashlib.algorithms_available.add("evil")
        def extend_netloc_schemes():
            urllib.parse.uses_netloc.append("evil")   # steers urljoin for everyone
        def rename_timezone():
            time.tzname[0] = "EVIL"
        def bend_the_default_context():
            decimal.DefaultContext.prec = 1          # the template of every new context
        ATTEMPTS = [("algorithms", add_algorithm), ("uses_netloc", extend_netloc_schemes),
                    ("tzname", rename_timezone), ("DefaultContext", bend_the_default_context)]
        def attack(req):
            for name, change in ATTEMPTS:
                try:
                    change()
                except (AttributeError, TypeError):
                    continue
                return {"escaped": True, "loot": "changed " + name}
            return {"escaped": False, "why": "facade tables are frozen"}
        """,
    ),
    attack(
        "exception_attribute_runs_in_error_reporting",
        Runtime("Hostile: hostile filename"),
        """
        class Hostile(SyntaxError):
            pass
        class Filename:
            def __eq__(self, other):     # called by the worker's describe(), outside any try
                raise ValueError("the worker's error reporting ran val code")
        def attack(req):
            error = Hostile("hostile filename")
            error.filename = Filename()
            raise error
        """,
    ),
    attack(
        "regex_debug_flag_prints_to_stdout",
        Runtime("the debug dump went nowhere"),
        """
        import re
        def attack(req):
            # The facade has no re.DEBUG, but flags are ints: 128 makes sre print its parse
            # tree to the process's stdout, which must not be the protocol channel.
            for i in range(200):
                re.compile("(?:a|b)*c" + "x" * i, 128)
            return {"escaped": False, "why": "the debug dump went nowhere"}
        """,
    ),
    attack(
        "library_callbacks_see_only_plain_values",
        Runtime("callbacks saw only plain values"),
        """
        import datetime, json, re
        seen = []
        def spy(value, *more):
            seen.append(value)
            seen.extend(more)
            return value
        class Zone(datetime.tzinfo):
            def utcoffset(self, dt):
                seen.append(dt)
                return datetime.timedelta(0)
        PLAIN = (dict, list, str, int, float, re.Match, datetime.datetime)
        def attack(req):
            json.loads('{"a": [1, 2.5, NaN]}', object_hook=spy, parse_float=spy,
                       parse_int=spy, parse_constant=spy)
            json.loads('[["k", 1]]', object_pairs_hook=spy)
            re.sub("(a)", lambda m: spy(m).group(1), "aa")
            sorted([3, 1], key=spy)
            str(datetime.datetime(2024, 1, 1, tzinfo=Zone()))
            json.dumps({1}, default=lambda o: spy(sorted(o)))
            odd = [repr(x) for x in seen if not isinstance(x, PLAIN)]
            if odd:
                return {"escaped": True, "loot": odd}
            return {"escaped": False, "why": "callbacks saw only plain values"}
        """,
    ),
    attack(
        "namedtuple_field_name_code_injection",
        Runtime("Type names and field names must be valid identifiers"),
        """
        import collections
        def attack(req):
            # namedtuple builds its __new__ with eval() from these names.
            Point = collections.namedtuple("Point", ["x, y=__import__('os').system('id')"])
            return {"escaped": True, "loot": repr(Point)}
        """,
    ),
    attack(
        "capwords_crafted_separator",
        Runtime("capwords handed the separator only strings"),
        """
        import string
        class Sep(str):
            def join(self, parts):
                self.parts = parts
                return "joined"
        def attack(req):
            sep = Sep(",")
            string.capwords("a,b", sep)
            leaked = getattr(sep.parts, "__reduce__", None)   # would reveal str.capitalize
            if leaked is not None:
                return {"escaped": True, "loot": repr(leaked)}
            words = list(sep.parts)
            return {"escaped": False, "why": "capwords handed the separator only strings "
                    + repr(words)}
        """,
    ),
]

# --- Resource bombs and limits -------------------------------------------------------------

LIMITS = [
    attack(
        "memory_bomb_single_allocation",
        Limit(502, "memory_limit"),
        """
        def attack(req):
            return len("x" * 2**31)
        """,
    ),
    attack(
        "memory_bomb_growing_hoard",
        Limit(502, "memory_limit"),
        """
        hoard = []
        def attack(req):
            while True:
                hoard.append(bytearray(2**20))
        """,
    ),
    attack(
        "cpu_in_a_c_loop",
        Limit(502, "cpu_limit"),
        """
        def attack(req):
            return all(range(1, 10**12))    # never checks for signals
        """,
    ),
    attack(
        "cpu_bomb_while_loading",
        Limit(502, "cpu_limit"),
        """
        SPIN = all(range(1, 10**12))     # at import time, before any request
        def attack(req):
            return SPIN
        """,
    ),
    attack(
        "sleep_while_loading",
        Limit(504, "timeout"),
        """
        import time
        time.sleep(60)
        def attack(req):
            return "never"
        """,
    ),
    attack(
        "cpu_spin_swallowing_every_exception",
        Limit(502, "cpu_limit"),
        """
        def attack(req):
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    pass
        """,
    ),
    attack(
        "huge_integer_power",
        Limit(502, "cpu_limit"),
        """
        def attack(req):
            return 10 ** (10**8) > 0
        """,
    ),
    attack(
        "factorial_in_c",
        Limit(502, "cpu_limit"),
        """
        import math
        def attack(req):
            return math.factorial(10**7) > 0
        """,
    ),
    attack(
        "pbkdf2_iterations",
        Limit(502, "cpu_limit"),
        """
        import hashlib
        def attack(req):
            return hashlib.pbkdf2_hmac("sha256", b"p", b"s", 10**9).hex()
        """,
    ),
    attack(
        "catastrophic_regex_backtracking",
        Limit(502, "cpu_limit"),
        """
        import re
        def attack(req):
            return repr(re.match(r"(a+)+$", "a" * 64 + "b"))
        """,
    ),
    attack(
        "integer_to_decimal_string_quadratic",
        Runtime("Exceeds the limit (4300 digits)"),
        """
        def attack(req):
            return str(10**100000)
        """,
    ),
    attack(
        "sleep_past_the_wall_clock",
        Limit(504, "timeout"),
        """
        import time
        def attack(req):
            time.sleep(60)      # no CPU used: only the front end's clock stops this
        """,
    ),
    attack(
        "timeout_swallowed_by_except_baseexception",
        Limit(504, "timeout"),
        """
        import time
        def attack(req):
            while True:
                try:
                    time.sleep(30)
                except BaseException:
                    pass
        """,
    ),
    attack(
        "deep_python_recursion",
        Runtime("RecursionError"),
        """
        def dive(n):
            return dive(n + 1) + 1
        def attack(req):
            return dive(0)
        """,
    ),
    attack(
        "deep_c_recursion_through_nested_iterators",
        # No recursion check in C: the stack's guard page ends the process (SIGSEGV).
        Limit(502, "worker_crashed"),
        """
        def attack(req):
            it = iter([1])
            for i in range(10**6):
                it = map(abs, it)
            return next(it)
        """,
    ),
    attack(
        "response_body_flood",
        Limit(502, "response_too_large"),
        """
        def attack(req):
            return "x" * (6 * 2**20)
        """,
    ),
    attack(
        "response_header_flood",
        Limit(502, "bad_response"),
        """
        def attack(req):
            return Response("x", 200, {"x-big": "y" * (70 * 1024)})
        """,
    ),
    attack(
        "compile_time_parenthesis_bomb",
        Compile("too many nested parentheses"),
        "x = " + "(" * 100_000 + ")" * 100_000 + "\ndef attack(req):\n    return x\n",
    ),
    attack(
        "compile_time_recursion_bomb",
        # Past the tokenizer's checks, the parser and compiler recurse until RecursionError.
        Compile("too deeply nested to compile"),
        "x = 1" + "+1" * 60_000 + "\ndef attack(req):\n    return x\n",
    ),
    attack(
        "nul_byte_in_source",
        Compile("source code string cannot contain null bytes"),
        "def attack(req):\n    return 1\n\x00\n",
    ),
    attack(
        "system_exit_at_module_level",
        Runtime("SystemExit"),
        """
        raise SystemExit(0)
        def attack(req):
            return "never"
        """,
    ),
    attack(
        "keyboard_interrupt_from_the_handler",
        Runtime("KeyboardInterrupt"),
        """
        def attack(req):
            raise KeyboardInterrupt
        """,
    ),
]

ATTACKS = [*CVE_CLASSES, *GUARD_SHADOWING, *WALKS, *BUILTINS, *IMPORTS, *WRITES, *LIMITS]

# --- The servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attack_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    db_path = tmp_path_factory.mktemp("attacks") / "v.db"
    with running_service(ATTACK_LIMITS, db_path, ATTACK_POOL) as running:
        yield running


@pytest.fixture(scope="module")
def sleeper_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    db_path = tmp_path_factory.mktemp("sleepers") / "v.db"
    with running_service(SLEEPER_LIMITS, db_path, SLEEPER_POOL) as running:
        yield running


# --- The attack table -------------------------------------------------------------------------


def test_attack_table_is_well_formed() -> None:
    names = [case.name for case in ATTACKS]
    assert len(set(names)) == len(names)
    assert all(VAL_RE.fullmatch(name) for name in names), names
    assert len(ATTACKS) >= 50


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            id=case.name,
            marks=[pytest.mark.xfail(reason=case.known_hole, strict=True)]
            if case.known_hole
            else [],
        )
        for case in ATTACKS
    ],
)
async def test_attack_is_refused_and_the_pool_recovers(
    case: Attack, attack_service: RunningService, sleeper_service: RunningService
) -> None:
    timeout = isinstance(case.outcome, Limit) and case.outcome.error_type == "timeout"
    running = sleeper_service if timeout else attack_service
    async with running.connect() as service:
        source = f"{case.source}\n{case.name} = attack\n"
        saved = await save(service, case.name, source)
        try:
            with trio.fail_after(30):
                if saved.status_code == 400 and isinstance(case.outcome, Compile | Runtime):
                    # Saving checks the code (compile, imports, export; runtime/savecheck.py):
                    # refused before it ever runs, with the same refusal the load would give.
                    error = saved.json()["error"]
                    assert error["type"] == "bad_code", error
                    problems = [problem["message"] for problem in error["problems"]]
                    assert any(case.outcome.fragment in p for p in problems), error
                else:
                    assert saved.status_code == 201, saved.text
                    response = await service.web("alice", case.name)
                    response = await as_owner_if_load_failed(service, case.name, response)
                    check_outcome(response, case.outcome)
                    assert_no_loot(response)
                await assert_service_recovers(service)
        finally:
            await service.api("DELETE", f"/v1/vals/alice/{case.name}")


# --- Between vals ---------------------------------------------------------------------------

PEEK_ENV = """
def {name}(req):
    return {{"other": env.get("{other}"), "keys": sorted(env), "copy": sorted(env.copy()),
            "repr": repr(env)}}
"""


async def test_a_val_sees_only_its_owners_env(attack_service: RunningService) -> None:
    secrets = {"alice": ("SECRET_A", "alice-secret-7d1f"), "bob": ("SECRET_B", "bob-secret-93c2")}
    async with attack_service.connect() as service:
        for user, (key, value) in secrets.items():
            put = await service.api("PUT", f"/v1/env/{key}", user=user, content=value.encode())
            assert put.status_code == 200, put.text
        try:
            with trio.fail_after(30):
                for user, other in (("alice", "bob"), ("bob", "alice")):
                    code = PEEK_ENV.format(name="peek", other=secrets[other][0])
                    assert (await save(service, "peek", code, user)).status_code == 201
                    peek = await service.web(user, "peek")
                    key, value = secrets[user]
                    assert peek.json() == {
                        "other": None,
                        "keys": [key],
                        "copy": [key],
                        "repr": f"<env keys=['{key}']>",
                    }
                    # Eval runs as the token's user, with that user's env only.
                    evaluated = await service.api(
                        "POST", "/v1/eval", user=user, json={"code": "dict(env)"}
                    )
                    assert evaluated.json() == {key: value}, evaluated.text
                    # Code bob puts in alice's namespace would run with her env: refused.
                    planted = await service.api(
                        "PUT",
                        f"/v1/vals/{other}/planted",
                        user=user,
                        json={"code": "def planted(req):\n    return dict(env)\n"},
                    )
                    assert planted.status_code == 403, planted.text
                    assert (await service.web(other, "planted")).status_code == 404
                    for response in (peek, evaluated, planted):
                        assert secrets[other][1] not in response.text
                await assert_service_recovers(service)
        finally:
            for user, (key, _) in secrets.items():
                await service.api("DELETE", f"/v1/env/{key}", user=user)
                await service.api("DELETE", f"/v1/vals/{user}/peek", user=user)


STATE_A = """
import decimal, random
MARK = "alice-module-state"
seen = []
def state(req):
    seen.append(MARK)
    random.seed(1234)
    decimal.getcontext().traps.update({decimal.Inexact: True})
    return {"seen": len(seen), "random": random.random()}
"""

STATE_B = """
import decimal, random
def state(req):
    try:
        leaked = MARK        # alice's module global, if this ran in her namespace
    except NameError:
        leaked = None
    return {"leaked": leaked, "inexact_trap": decimal.getcontext().traps[decimal.Inexact],
            "random": random.random()}
"""


async def test_module_state_of_one_val_is_invisible_to_another(
    attack_service: RunningService,
) -> None:
    async with attack_service.connect() as service:
        # Same val name, two owners: two workers, two namespaces, two processes' libraries.
        assert (await save(service, "state", STATE_A, "alice")).status_code == 201
        assert (await save(service, "state", STATE_B, "bob")).status_code == 201
        try:
            with trio.fail_after(30):
                first = (await service.web("alice", "state")).json()
                second = (await service.web("alice", "state")).json()
                other = (await service.web("bob", "state")).json()
        finally:
            for user in ("alice", "bob"):
                await service.api("DELETE", f"/v1/vals/{user}/state", user=user)
    assert (first["seen"], second["seen"]) == (1, 2)  # alice's state lives in her worker
    assert other["leaked"] is None
    assert other["inexact_trap"] is False
    assert other["random"] != first["random"]


# Each import is in a `try` that catches the refusal, which the check at save lets through:
# the load must still refuse it.
FILE_THIEF = """
import base64, datetime, hashlib, json, re, time, uuid
def via_io(path):
    try: import io
    except ImportError: raise
    return io.open(path).read()
def via_pathlib(path):
    try: import pathlib
    except ImportError: raise
    return pathlib.Path(path).read_text()
def via_os(path):
    try: import os
    except ImportError: raise
    return os.read(os.open(path, 0), 1 << 20).decode()
def via_codecs(path):
    try: import codecs
    except ImportError: raise
    return codecs.open(path).read()
def via_linecache(path):
    try: import linecache
    except ImportError: raise
    return "".join(linecache.getlines(path))
def via_inspect_own_source(path):
    try: import inspect
    except ImportError: raise
    return inspect.getsource(files)
def via_sqlite(path):
    try: import sqlite3
    except ImportError: raise
    return repr(sqlite3.connect(path).execute("select * from env").fetchall())
def via_urllib_request(path):
    try: import urllib.request
    except ImportError: raise
    return urllib.request.urlopen("file://" + path).read().decode()
ROUTES = [
    ("open", lambda path: open(path).read()),
    ("io", via_io), ("pathlib", via_pathlib), ("os", via_os), ("codecs", via_codecs),
    ("linecache", via_linecache),
    ("inspect", via_inspect_own_source), ("sqlite3", via_sqlite),
    ("urllib.request", via_urllib_request),
    ("json.codecs", lambda path: json.codecs.open(path).read()),
    ("re.enum.sys", lambda path: re.enum.sys.modules["io"].open(path).read()),
    ("datetime.sys", lambda path: datetime.sys.modules["io"].open(path).read()),
    ("uuid.os", lambda path: uuid.os.read(uuid.os.open(path, 0), 1 << 20).decode()),
    ("base64.binascii", lambda path: base64.binascii.a2b_base64(path)),
    ("hashlib.file_digest", lambda path: hashlib.file_digest(path, "sha256").hexdigest()),
    ("time.tzset", lambda path: time.tzset()),
]
def files(req):
    path = req.query.get("path")
    refusals = []
    for name, read in ROUTES:
        try:
            return {"escaped": True, "route": name, "loot": read(path)}
        except Exception as e:
            refusals.append(name + ": " + repr(e))
    return {"escaped": False, "refusals": refusals}
"""


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", "store"])
async def test_a_val_reads_no_file(attack_service: RunningService, path: str) -> None:
    # The OS layer (Landlock) is the second line; RestrictedPython and the facades must
    # offer no file access at all, whatever the path.
    target = str(attack_service.db_path) if path == "store" else path
    async with attack_service.connect() as service:
        assert (await save(service, "files", FILE_THIEF)).status_code in (200, 201)
        with trio.fail_after(30):
            response = await service.web("alice", "files", params={"path": target})
            await assert_service_recovers(service)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["escaped"] is False, body
    assert len(body["refusals"]) == 16
    for refusal in body["refusals"]:
        assert re.search(r"(ImportError|NameError|AttributeError)\(", refusal), refusal
    assert_no_loot(response)
    assert "root:" not in response.text


# --- Headers a val may not set ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "why"),
    [
        pytest.param(
            r'Response("x", 200, {"x-a\x00b": "v"})', "invalid header name", id="nul_in_name"
        ),
        pytest.param(
            'Response("x", 200, {":status": "101"})', "invalid header name", id="pseudo_header"
        ),
        pytest.param('Response("x", 200, {"x:y": "v"})', "invalid header name", id="colon_in_name"),
        pytest.param('Response("x", 200, {"": "v"})', "invalid header name", id="empty_name"),
        pytest.param(r'Response("x", 200, {"x-f": "a\r\n b"})', "control character", id="obs_fold"),
        pytest.param(r'Response("x", 200, {"x-cr": "a\rb"})', "control character", id="bare_cr"),
        pytest.param(r'Response("x", 200, {"x-del": "a\x7fb"})', "control character", id="del"),
        pytest.param(
            r'Response("x", 200, {"x-ls": "a\u2028b"})', "cannot carry", id="unicode_line_separator"
        ),
        pytest.param(
            r'Response.redirect("/next\r\nSet-Cookie: s=1")',
            "control character",
            id="redirect_location_splitting",
        ),
    ],
)
async def test_header_injection_is_refused(
    attack_service: RunningService, response: str, why: str
) -> None:
    async with attack_service.connect() as service:
        code = f"def inject(req):\n    return {response}\n"
        assert (await save(service, "inject", code)).status_code in (200, 201)
        with trio.fail_after(30):
            error = json_error(await service.web("alice", "inject"), 502, "bad_response")
            assert why in error["message"]
            await assert_service_recovers(service)


@pytest.mark.parametrize(
    ("cookie", "kept"),
    [
        pytest.param("a=1; Path=/; HttpOnly", True, id="no_domain"),
        pytest.param("a=1; Domain=ALICE-COOKIE.web.localhost", True, id="own_host_any_case"),
        pytest.param(
            "a=1; Domain=alice-cookie.web.localhost; Domain=web.localhost",
            False,
            id="last_domain_wins",
        ),
        pytest.param("a=1; Domain=WEB.LOCALHOST", False, id="wider_in_capitals"),
        pytest.param("a=1; dOmAiN = web.localhost", False, id="spaced_attribute"),
        pytest.param('a=1; Domain="web.localhost"', False, id="quoted_domain"),
        pytest.param("a=1; Domain=localhost", False, id="top_level"),
        pytest.param("a=1; Domain=web.localhost.", False, id="trailing_dot"),
        pytest.param("a=1; Domain=bob-cookie.web.localhost", False, id="sibling_val"),
        pytest.param("a=1, b=2; Domain=web.localhost", False, id="folded_second_cookie"),
    ],
)
async def test_cookie_for_a_domain_wider_than_the_val_is_dropped(
    attack_service: RunningService, cookie: str, kept: bool
) -> None:
    async with attack_service.connect() as service:
        code = f"def cookie(req):\n    return Response('ok', 200, [('set-cookie', {cookie!r})])\n"
        assert (await save(service, "cookie", code)).status_code in (200, 201)
        with trio.fail_after(30):
            response = await service.web("alice", "cookie")
    assert response.status_code == 200
    assert response.headers.get_list("set-cookie") == ([cookie] if kept else [])


FORGED_FRAMING = """
def framing(req):
    return Response("hello", 200, [
        ("content-length", "0"), ("transfer-encoding", "chunked"), ("connection", "close"),
        ("keep-alive", "timeout=0"), ("date", "forged"), ("server", "forged"),
        ("trailer", "x-late"), ("upgrade", "h2c"), ("te", "trailers"),
    ])
"""


async def _exchange(
    stream: trio.SocketStream, connection: h11.Connection, host: str, target: str = "/"
) -> tuple[h11.Response, bytes]:
    request = h11.Request(method="GET", target=target, headers=[("host", host)])
    await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    head: h11.Response | None = None
    body = b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body
        else:
            raise AssertionError(f"unexpected {event!r}")


async def test_forged_framing_headers_cannot_desync_the_connection(
    attack_service: RunningService,
) -> None:
    async with attack_service.connect() as service:
        assert (await save(service, "framing", FORGED_FRAMING)).status_code in (200, 201)
        framing_host = service.web_host("alice", "framing")
        hello_host = service.web_host("alice", "hello")
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", attack_service.port)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            head, body = await _exchange(stream, connection, framing_host)
            headers = dict(head.headers)
            assert (head.status_code, body) == (200, b"hello")
            assert headers[b"content-length"] == b"5"
            for name in (b"transfer-encoding", b"connection", b"keep-alive", b"trailer"):
                assert name not in headers, head.headers
            for name in (b"upgrade", b"te"):
                assert name not in headers, head.headers
            assert headers.get(b"date") != b"forged"
            assert headers.get(b"server") != b"forged"
            # The same keep-alive connection carries the next request, framed correctly.
            connection.start_next_cycle()
            head, body = await _exchange(stream, connection, hello_host, "/?name=next")
            assert head.status_code == 200
            assert body == b'{"greeting":"hi next"}'


# --- The Eval API applies the same policy ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        pytest.param("(1).__class__.__base__", UNDERSCORE, id="dunder_attribute"),
        pytest.param("getattr((x for x in []), 'gi_frame')", "restricted name", id="frame"),
        pytest.param("open('/etc/hostname').read()", "name 'open' is not defined", id="open"),
        pytest.param("'{0.__class__}'.format(1)", STR_FORMAT, id="str_format"),
        pytest.param("import os\nos.environ", "import of 'os' is not allowed", id="import_os"),
    ],
)
async def test_eval_refuses_the_same_attacks(
    attack_service: RunningService, code: str, fragment: str
) -> None:
    async with attack_service.connect() as service:
        with trio.fail_after(30):
            response = await service.api("POST", "/v1/eval", json={"code": code})
            error = json_error(response, 502, "val_error")
            assert fragment in error["message"]
            assert_no_loot(response)
            await assert_service_recovers(service)


if __name__ == "__main__":
    print(collections.Counter(type(case.outcome).__name__ for case in ATTACKS), len(ATTACKS))
