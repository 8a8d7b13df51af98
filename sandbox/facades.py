"""Import facades: what a val gets instead of a real stdlib module.

A real module is an escape hatch even when RestrictedPython refuses every `_name`: plain
attributes lead out (`re.enum.sys`, `json.codecs.open`, `datetime.sys`,
`re.functools.update_wrapper`, see docs/design.md §2.3). So `import json` in a val yields a
`Facade`: an immutable namespace of vetted functions, classes and constants copied from the real
module, and nothing else. The member lists below are the policy; each says why it is what it is.

Rules every list follows:
- no modules, and nothing that opens files, touches the OS or spawns processes;
- no mutable process-wide tables (`urllib.parse.uses_netloc`, `decimal.DefaultContext`, ...):
  a warm worker keeps its state between invocations, so a val must not be able to bend
  library behaviour behind the sandbox's back;
- enums become plain ints, so the enum machinery (and `enum`'s module globals) is not reachable.

Facades are built once per worker process, at import time, before the worker is confined
(Landlock, uid drop); lazy imports the members would do on first call are done here too,
because a confined worker cannot read new files.

Stdlib only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import base64
import bisect
import codecs
import collections
import csv
import datetime
import decimal
import enum
import functools
import hashlib
import heapq
import hmac
import html
import importlib
import itertools
import json
import math
import operator
import os
import random
import re
import statistics
import string
import sys
import textwrap
import time
import typing
import unicodedata  # noqa: F401  (preloaded: re's \N{...} and urlsplit's netloc check import it)
import urllib.parse
import uuid
import zoneinfo
from collections.abc import Mapping, Sequence
from types import MappingProxyType, ModuleType
from typing import Any, final

from sandbox import shims


@final
class Facade:
    """A read-only, module-like namespace handed to val code in place of a real module.

    Members live in a mappingproxy behind an underscore slot: RestrictedPython refuses
    `_` names, so user code reaches members only through `__getattr__`, and never the mapping.
    """

    __slots__ = ("_members", "_name")

    _members: Mapping[str, object]
    _name: str

    def __init__(self, name: str, members: Mapping[str, object]) -> None:
        for key, value in members.items():
            # The two mistakes that would turn a facade back into an escape hatch.
            if key.startswith("_") or isinstance(value, ModuleType):
                raise ValueError(f"facade {name!r} may not hold {key!r} ({value!r})")
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_members", MappingProxyType(dict(members)))

    def __getattr__(self, attr: str) -> Any:  # Any: the exec edge, members are whatever they are
        # Called only after normal lookup failed. Underscore names are never members; answer
        # them without touching the slots, so probes on a half-built instance (copy, pickle)
        # cannot recurse.
        if attr.startswith("_"):
            raise AttributeError(f"valrun facades have no attribute {attr!r}", name=attr, obj=self)
        try:
            return self._members[attr]
        except KeyError:
            instead = _INSTEAD.get(f"{self._name}.{attr}")
            # `from None`: the KeyError's context would only add noise to the val's traceback.
            raise AttributeError(
                f"valrun's {self._name!r} has no attribute {attr!r}"
                + (f": {instead}" if instead else ""),
                name=attr,
                obj=self,
            ) from None

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError(f"valrun's {self._name!r} is read-only; cannot set {attr!r}")

    def __delattr__(self, attr: str) -> None:
        raise AttributeError(f"valrun's {self._name!r} is read-only; cannot delete {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted(self._members)

    def __repr__(self) -> str:
        return f"<valrun facade {self._name!r}>"


@final
class ValModule:
    """Another val, imported (`import vals.USER.VAL as v`): its exports, read live from its
    module's namespace, so a name its functions rebind (`global count`) reads as it is now.

    Exports are the module's top-level names that do not start with `_`, but for what the
    sandbox put there itself (`env`, `Request`, `Response`): `hidden` maps those names to the
    objects that are not the val's own. Like a facade it is read-only, and its slots are
    `_` names that vals cannot reach.
    """

    __slots__ = ("_hidden", "_label", "_namespace")

    _hidden: Mapping[str, object]
    _label: str
    _namespace: Mapping[str, object]

    def __init__(
        self, label: str, namespace: Mapping[str, object], hidden: Mapping[str, object]
    ) -> None:
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_namespace", namespace)
        object.__setattr__(self, "_hidden", MappingProxyType(dict(hidden)))

    # Host-side helpers are `_` names: a public method would shadow an export of its name.
    def _exports(self) -> list[str]:
        """The names it exports now, sorted (for messages)."""
        return sorted(name for name in list(self._namespace) if self._exported(name))

    def _exported(self, name: str) -> bool:
        if type(name) is not str or name.startswith("_") or name not in self._namespace:
            return False
        return name not in self._hidden or self._namespace[name] is not self._hidden[name]

    def __getattr__(self, attr: str) -> Any:  # Any: the exec edge, exports are anything
        if attr.startswith("_") or not self._exported(attr):
            # The same words whether the name is private, absent, or the sandbox's own.
            raise AttributeError(
                f"the val {self._label} exports no {attr!r}", name=attr, obj=None
            ) from None
        return self._namespace[attr]

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError(f"the val {self._label} is read-only here; cannot set {attr!r}")

    def __delattr__(self, attr: str) -> None:
        raise AttributeError(f"the val {self._label} is read-only here; cannot delete {attr!r}")

    def __dir__(self) -> list[str]:
        return self._exports()

    def __repr__(self) -> str:
        return f"<val {self._label}>"


def _take(module: ModuleType, names: str) -> dict[str, object]:
    # getattr, not a dir() sweep: a name a future Python adds is not exposed until someone
    # vets it and lists it here. A listed name that disappears fails loudly at worker start.
    return {name: getattr(module, name) for name in names.split()}


def _as_ints(module: ModuleType, names: str) -> dict[str, object]:
    return {name: int(getattr(module, name)) for name in names.split()}


def _system_timezones() -> frozenset[str]:
    """The zones of the system's tz database (zoneinfo.TZPATH), the one the facade serves.
    Not `zoneinfo.available_timezones()`: that also imports the PyPI `tzdata` package when one
    is installed, and the sandbox imports nothing but the standard library."""
    zones = set()
    for root in zoneinfo.TZPATH:
        for folder, _dirs, files in os.walk(root):
            for file in files:
                path = os.path.join(folder, file)
                try:
                    with open(path, "rb") as f:
                        if f.read(4) != b"TZif":  # zone files start so (RFC 8536 §3.1)
                            continue
                except OSError:
                    continue
                key = os.path.relpath(path, root)
                if not key.startswith(("posix" + os.sep, "right" + os.sep)) and key != "posixrules":
                    zones.add(key)
    return frozenset(zones)


_TIMEZONES = _system_timezones()


def _available_timezones() -> set[str]:
    """The keys `zoneinfo.ZoneInfo` accepts here (a fresh set: the val may change it)."""
    return set(_TIMEZONES)


def _build() -> Mapping[str, Facade]:
    members: dict[str, dict[str, object]] = {
        # Not dump/load (they exist for file objects, which vals do not have), not the
        # decoder/encoder/scanner submodules, never `codecs` (`json.codecs.open`). The two
        # classes stay for `cls=` customisation; their methods are plain functions.
        "json": _take(json, "dumps loads JSONDecodeError JSONDecoder JSONEncoder"),
        # Flags become ints: `re.I` is a RegexFlag whose class drags in enum machinery.
        # Left out: purge (clears a process-wide cache), template/TEMPLATE (deprecated),
        # DEBUG (makes the compiler print to the process's real stdout, which may be the
        # worker's wire), LOCALE (depends on the worker's C locale, not the val's),
        # RegexFlag (the enum), Scanner (undocumented), the enum/functools/copyreg modules.
        "re": _take(re, "compile search match fullmatch split findall finditer sub subn escape")
        | _take(re, "error Pattern Match")
        | _as_ints(re, "NOFLAG A ASCII I IGNORECASE M MULTILINE S DOTALL U UNICODE X VERBOSE"),
        # Not `sys` (a plain attribute of the real module) nor `datetime_CAPI`, a capsule of
        # raw C pointers. `tzinfo` stays so vals can write their own zones.
        "datetime": _take(datetime, "date time datetime timedelta timezone tzinfo UTC")
        | _take(datetime, "MINYEAR MAXYEAR"),
        # Every public name of 3.11's math: pure C functions over numbers and float constants.
        "math": _take(
            math,
            "acos acosh asin asinh atan atan2 atanh cbrt ceil comb copysign cos cosh degrees dist"
            " e erf erfc exp exp2 expm1 fabs factorial floor fmod frexp fsum gamma gcd hypot inf"
            " isclose isfinite isinf isnan isqrt lcm ldexp lgamma log log10 log1p log2 modf nan"
            " nextafter perm pi pow prod radians remainder sin sinh sqrt tan tanh tau trunc ulp",
        ),
        # The module-level functions, bound to random's hidden shared instance on purpose:
        # random re-seeds that instance after fork (os.register_at_fork), so forked workers do
        # not replay each other's numbers; a Random() built here would. Its state is the
        # worker's, and a worker runs one val version. SystemRandom (os.urandom via the
        # getrandom syscall) is the only source of secure tokens, since `secrets` is not offered.
        "random": _take(
            random,
            "random uniform randint randrange choice choices shuffle sample getrandbits randbytes"
            " gauss normalvariate lognormvariate expovariate vonmisesvariate gammavariate"
            " triangular betavariate paretovariate weibullvariate seed getstate setstate"
            " Random SystemRandom",
        ),
        # Constants and capwords only. Formatter resolves `{0.attr}` / `{0[key]}` with the real
        # getattr/getitem, bypassing RestrictedPython's guards (the str.format hole of
        # CVE-2023-41039; importing it was CVE-2026-76825). Template is its sibling: a class
        # hierarchy with an `__init_subclass__` hook that buys nothing over f-strings.
        "string": _take(
            string,
            "ascii_letters ascii_lowercase ascii_uppercase digits hexdigits octdigits"
            " punctuation printable whitespace capwords",
        ),
        # The bytes-in, bytes-out pairs. Not encode/decode (file-object loops), not main
        # (a CLI reading sys.stdin and files), never `binascii` (a module; its Error is a
        # ValueError, which is what a val should catch).
        "base64": _take(
            base64,
            "b64encode b64decode standard_b64encode standard_b64decode urlsafe_b64encode"
            " urlsafe_b64decode b32encode b32decode b32hexencode b32hexdecode b16encode"
            " b16decode a85encode a85decode b85encode b85decode encodebytes decodebytes",
        ),
        # Constructors and pbkdf2_hmac. Not file_digest (reads a file object), not scrypt
        # (present only with some OpenSSL builds, so a val's imports would depend on the host).
        # The algorithm sets are real module-level `set`s other code consults: copy them frozen.
        "hashlib": _take(
            hashlib,
            "md5 sha1 sha224 sha256 sha384 sha512 sha3_224 sha3_256 sha3_384 sha3_512"
            " shake_128 shake_256 blake2b blake2s new pbkdf2_hmac",
        )
        | {
            "algorithms_guaranteed": frozenset(hashlib.algorithms_guaranteed),
            "algorithms_available": frozenset(hashlib.algorithms_available),
        },
        # The documented API. The HMAC class adds nothing `new` does not return; the
        # trans_5C/trans_36 tables are implementation details.
        "hmac": _take(hmac, "new digest compare_digest"),
        # Not the uses_*/scheme_chars/non_hierarchical lists (mutable process-wide tables
        # that steer urljoin and urlsplit for everyone), not clear_cache, not the deprecated
        # split*/to_bytes/unwrap helpers. urlsplit is an lru_cache wrapper: its public
        # cache_info/cache_clear only report on or empty that cache.
        "urllib.parse": _take(
            urllib.parse,
            "quote quote_plus quote_from_bytes unquote unquote_plus unquote_to_bytes urlencode"
            " urlparse urlsplit urlunparse urlunsplit urljoin urldefrag parse_qs parse_qsl",
        ),
        # Clocks, sleep and conversions. Not tzset (re-reads TZ from the process environment
        # and changes every later conversion in the worker), not clock_settime, not the
        # pthread/thread clock helpers. Only the OS stops a long sleep (docs/design.md §2.5).
        "time": _take(
            time,
            "time time_ns monotonic monotonic_ns perf_counter perf_counter_ns process_time sleep"
            " gmtime localtime mktime strftime strptime asctime ctime struct_time"
            " timezone altzone daylight tzname",
        ),
        # The containers. Not collections.abc (a module) nor the User* classes (nothing a
        # val cannot do with a plain subclass). ChainMap inherits ABCMeta.register, which only
        # changes isinstance answers inside this worker.
        "collections": _take(
            collections, "Counter OrderedDict defaultdict deque namedtuple ChainMap"
        ),
        # Every public name of 3.11's itertools: lazy C iterators, nothing else.
        "itertools": _take(
            itertools,
            "accumulate chain combinations combinations_with_replacement compress count cycle"
            " dropwhile filterfalse groupby islice pairwise permutations product repeat starmap"
            " takewhile tee zip_longest",
        ),
        # Decimal, contexts, rounding modes and signals. Not DefaultContext (the mutable
        # template every new thread's context is copied from), nor BasicContext/ExtendedContext
        # (shared mutable singletons): `Context(...)` builds the same settings unshared.
        "decimal": _take(
            decimal,
            "Decimal Context localcontext getcontext setcontext ROUND_UP ROUND_DOWN ROUND_CEILING"
            " ROUND_FLOOR ROUND_HALF_UP ROUND_HALF_DOWN ROUND_HALF_EVEN ROUND_05UP"
            " DecimalException Clamped InvalidOperation DivisionByZero Inexact Rounded"
            " Subnormal Overflow Underflow FloatOperation MAX_PREC MAX_EMAX MIN_EMIN MIN_ETINY",
        ),
        # Not uuid1/getnode: finding the MAC address may read files or run ifconfig/ip. Not
        # SafeUUID (an enum; UUIDs still carry one in `is_safe`, whose members hold only
        # name/value).
        "uuid": _take(
            uuid,
            "UUID uuid3 uuid4 uuid5 NAMESPACE_DNS NAMESPACE_URL NAMESPACE_OID NAMESPACE_X500"
            " RFC_4122 RESERVED_NCS RESERVED_MICROSOFT RESERVED_FUTURE",
        ),
        # Not html.entities / html.parser (submodules; the parser is a stateful class tree).
        "html": _take(html, "escape unescape"),
        # Not wraps/update_wrapper: they copy `__dict__` and dunders between any two objects
        # with the real getattr/setattr, past the write guard. Not singledispatch: it reads
        # annotations through typing.get_type_hints, which `eval`s strings unrestricted.
        # lru_cache's wrapper offers cache_info/cache_clear/cache_parameters (its own cache)
        # and `__wrapped__`, which RestrictedPython refuses as a `_` name.
        "functools": _take(
            functools, "reduce partial lru_cache cache cmp_to_key total_ordering cached_property"
        ),
        # Every public function and class of 3.11's statistics: pure arithmetic over numbers.
        "statistics": _take(
            statistics,
            "mean fmean geometric_mean harmonic_mean median median_low median_high"
            " median_grouped mode multimode pstdev pvariance stdev variance quantiles"
            " correlation covariance linear_regression NormalDist StatisticsError",
        ),
        # Comparisons, arithmetic and item access: what operators do, as functions. Not
        # attrgetter/methodcaller (they read attributes with the real getattr, `_` names
        # included: `attrgetter('__class__')`), not setitem/delitem/the in-place i* forms
        # (writes past the write guard).
        "operator": _take(
            operator,
            "lt le eq ne ge gt not_ truth is_ is_not abs add and_ floordiv index inv invert"
            " lshift mod mul matmul neg or_ pos pow rshift sub truediv xor concat contains"
            " countOf indexOf getitem itemgetter length_hint call",
        ),
        "bisect": _take(bisect, "bisect bisect_left bisect_right insort insort_left insort_right"),
        "heapq": _take(
            heapq, "heappush heappop heapify heapreplace heappushpop nlargest nsmallest merge"
        ),
        # The functions (they take TextWrapper's options as keywords). Not the TextWrapper
        # class: its `unicode_whitespace_trans` is a dict every later wrap in the worker reads.
        "textwrap": _take(textwrap, "wrap fill shorten dedent indent"),
        # Readers and writers over any iterable of lines and anything with `write` (the io
        # facade's StringIO). Not register_dialect/unregister_dialect/field_size_limit: they
        # change process-wide tables. The dialect classes are read-only to vals (write guard).
        "csv": _take(
            csv,
            "reader writer DictReader DictWriter Sniffer Dialect excel excel_tab unix_dialect"
            " Error get_dialect list_dialects",
        )
        | _as_ints(csv, "QUOTE_ALL QUOTE_MINIMAL QUOTE_NONE QUOTE_NONNUMERIC"),
        "io": {"StringIO": shims.StringIO},
        # The classes and decorators for defining enums (class syntax works: the policy's
        # metaclass hook prepares the namespace EnumType needs). Not global_enum (writes the
        # members into `sys.modules[cls.__module__]`, and a val named `os` has that module
        # name), nor the pickling and repr helpers.
        "enum": _take(enum, "Enum IntEnum StrEnum Flag IntFlag auto unique"),
        # Names for annotations. Not get_type_hints/ForwardRef (they `eval` annotation strings
        # unrestricted), nor the runtime-introspection helpers.
        "typing": _take(
            typing,
            "Any Optional Union List Dict Tuple Set FrozenSet Type Callable Iterable Iterator"
            " Generator Mapping MutableMapping Sequence MutableSequence Literal Final ClassVar"
            " Annotated TypeVar Generic Protocol NamedTuple TypedDict NoReturn Never Self"
            " LiteralString cast overload",
        )
        | {"TYPE_CHECKING": False},
        # The system's tz database (Landlock lets workers read it, see sandbox.landlock).
        # available_timezones walks the directories: done once here, copied per call.
        "zoneinfo": _take(zoneinfo, "ZoneInfo ZoneInfoNotFoundError")
        | {"available_timezones": _available_timezones},
    }
    facades = {name: Facade(name, table) for name, table in members.items()}
    # `import urllib.parse` binds `urllib`, so the parent exists, holding only the child.
    facades["urllib"] = Facade("urllib", {"parse": facades["urllib.parse"]})
    return MappingProxyType(facades)


# What json.detect_encoding can answer for bytes input.
_JSON_ENCODINGS = (
    "utf-8-sig",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "utf-32-le",
    "utf-32-be",
)


def _preload() -> None:
    """Do now the lazy work members would do on first call, while files are still readable."""
    time.strptime("2000", "%Y")  # imports _strptime (and calendar, locale)
    datetime.datetime.strptime("2000", "%Y")  # _datetime keeps its own reference to _strptime
    statistics.NormalDist().samples(1, seed=1)  # random's seeding by a value
    csv.Sniffer().sniff("a,b\n1,2\n")
    zoneinfo.ZoneInfo("UTC")
    # An unknown key makes zoneinfo look for the PyPI `tzdata` package through
    # importlib.resources (stdlib): imported here, so that look-up fails as ZoneInfoNotFoundError
    # in the worker rather than as an ImportError.
    importlib.import_module("importlib.resources")
    time.localtime()  # the C library reads /etc/localtime once
    collections.Counter("ab").most_common(1)  # imports heapq
    for algorithm in sorted(hashlib.algorithms_guaranteed):
        hashlib.new(algorithm)  # OpenSSL may load providers; builtins may import _sha3 etc.
    # json.loads(bytes) decodes UTF-16/32 input, and codecs import encodings.* lazily.
    for encoding in _JSON_ENCODINGS:
        codecs.lookup(encoding)


_FACADES = _build()
_preload()

FACADE_NAMES: frozenset[str] = frozenset(_FACADES)
_ALLOWED = ", ".join(sorted(FACADE_NAMES))
_HOST_IMPORT = Facade("host import", {})


# What to use instead of a module vals do not get, where there is something; the rest are
# refused with the list of what is offered.
_NO_NETWORK = (
    "vals have no network of their own; make HTTP requests with `from std import fetch` (std.fetch)"
)
_NO_OS = (
    "vals have no operating system access (no files, processes or environment variables); "
    "read configuration from `env`"
)
_INSTEAD: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(
            (
                *("requests", "httpx", "aiohttp", "urllib3", "urllib.request", "http"),
                *("http.client", "socket", "ssl", "ftplib", "smtplib"),
            ),
            _NO_NETWORK,
        ),
        "sqlite3": "vals get no files; use a database with `from std import sqlite` (std.sqlite)",
        **dict.fromkeys(("os", "os.path", "sys", "subprocess", "shutil", "pathlib"), _NO_OS),
        **dict.fromkeys(("tempfile", "glob"), _NO_OS),
        "asyncio": "vals run synchronously: write 'def' handlers, not 'async def'",
        "pickle": "use json (pickle runs code while it loads)",
        "secrets": "use random.SystemRandom() for tokens (secrets is not offered)",
        "string.Formatter": "use str.format or f-strings",
        "operator.attrgetter": "use a lambda (lambda x: x.name): its attribute reads are guarded",
        "operator.methodcaller": "use a lambda (lambda x: x.name(...))",
        "functools.wraps": "copy what you need by hand (wraps reaches past the write guard)",
        "dataclasses": "use collections.namedtuple or a plain class (see the README)",
    }
)

# Imports that C code in the interpreter makes on its own while a val calls it: PyImport_Import
# looks `__import__` up in the *current frame's* builtins, which are the val's, so
# `time.strptime` and `datetime.strptime` would ask the val's hook for `_strptime`.
# PyImport_Import ignores what `__import__` returns and reads sys.modules itself; the module was
# imported before confinement (`_preload`), so the hook only has to not refuse. Val code cannot
# ask for these names: RestrictedPython refuses `_` names in imports.
_HOST_IMPORTS = frozenset({"_strptime"})


def _refusal_of_module(name: str) -> str:
    instead = _INSTEAD.get(name) or _INSTEAD.get(name.partition(".")[0])
    hint = f"; {instead}" if instead else ""
    return f"import of {name!r} is not allowed in a val{hint}; allowed modules: {_ALLOWED}"


def import_refusal(
    name: str,
    fromlist: Sequence[str] | None = None,
    level: int = 0,
    extra: Mapping[str, Facade] = MappingProxyType({}),
) -> str | None:
    """Why importing `name` (and `fromlist` from it) is refused, or None when it is allowed.

    The same text at save (sandbox.check) and at load (`import_facade`); `extra` as there.
    """
    if level != 0:
        return f"relative import of {name!r} is not allowed in a val; import one of: {_ALLOWED}"
    facade = extra.get(name) or _FACADES.get(name)
    if facade is None:
        # Also covers submodules of allowed modules (`re.enum`, `json.decoder`).
        return _refusal_of_module(name)
    offered = facade._members
    for item in fromlist or ():
        if item == "*":
            # A star import would bind whatever the facade holds; say what to write instead.
            return f"'from {name} import *' is not allowed in a val; import names one by one"
        if item not in offered:
            instead = _INSTEAD.get(f"{name}.{item}")
            return (
                f"cannot import {item!r} from {name!r}"
                + (f": {instead}" if instead else "")
                + f"; valrun's {name} offers only: "
                + ", ".join(sorted(offered))
            )
    return None


def import_facade(
    name: str,
    fromlist: Sequence[str] | None = None,
    level: int = 0,
    extra: Mapping[str, Facade] = MappingProxyType({}),
) -> Facade:
    """`__import__` for vals: return a facade, or refuse with an ImportError that names why.

    `extra` holds the facades made for one worker (`std`, whose members ask the front end).

    As with `__import__`, `import a.b` returns the facade of `a` (the name that gets bound)
    and `from a.b import c` returns the facade of `a.b`, after checking every imported name.
    """
    if name in _HOST_IMPORTS and level == 0 and name in sys.modules:
        return _HOST_IMPORT
    refusal = import_refusal(name, fromlist, level, extra)
    if refusal is not None:
        raise ImportError(refusal, name=name)
    if not fromlist:
        top = name.partition(".")[0]
        return extra.get(top) or _FACADES[top]
    return extra.get(name) or _FACADES[name]
