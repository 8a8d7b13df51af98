"""The RestrictedPython policy: how a val's source becomes a callable export. The only `exec`.

Policy is data here, as in RestrictedPython itself: the builtins a val gets, the guards its
compiled code calls (`_getattr_`, `_write_`, ...) and the import facades. Each guard exists
because RestrictedPython rewrites an operation into a call to it; a missing guard is a
`NameError` at run time, a lax one is an escape. Every change here re-runs tests/test_attacks.
"""

from __future__ import annotations

import abc
import builtins
import collections
import enum
import io
import operator
import re
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

from RestrictedPython.compile import compile_restricted_exec
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safe_builtins,
    safer_getattr_raise,
)

from sandbox.errors import ValError
from sandbox.facades import Facade, import_facade
from sandbox.http import Request, Response
from sandbox.resolved import forwards, refusal
from sandbox.shims import (
    BoundFormat,
    BoundFormatMap,
    ValFormatter,
    str_method_owner,
    unbound_format,
)

# `id` leaks addresses (a help to memory-corruption exploits); `setattr`/`delattr` are
# re-added below through our own write guard rather than RestrictedPython's.
# RestrictedPython's guard, with the types it has but does not declare.
_restricted_getattr = cast(Callable[[object, str], object], safer_getattr_raise)

_REMOVED_BUILTINS = {"id", "setattr", "delattr"}

# Builtins beyond RestrictedPython's `safe_builtins` that vals reasonably need. None of them
# reaches frames, globals or the import system; `type`, `vars`, `dir`, `globals`, `open`,
# `getattr` (real), `super` without guards and `object` are deliberately absent.
_EXTRA_BUILTINS: dict[str, object] = {
    name: getattr(builtins, name)
    for name in [
        *("all", "any", "ascii", "bin", "bytearray", "bytes", "classmethod", "dict"),
        *("enumerate", "filter", "format", "frozenset", "iter", "list", "map", "max", "min"),
        *("next", "property", "reversed", "set", "sorted", "staticmethod", "sum", "tuple"),
        *("zip", "StopAsyncIteration", "RecursionError"),
    ]
}

# Attribute reads refused on top of RestrictedPython's rules. `obj` on an AttributeError is
# the object the lookup failed on (CVE-2024-47532 handed back the real `string` module);
# `mro` walks to `object`, the start of every subclass walk; `register` on an ABC
# (`collections.ChainMap`) writes into the process-wide ABC registry that every host
# `isinstance(x, Mapping)` consults.
_REFUSED_ATTRIBUTES: dict[type, frozenset[str]] = {
    BaseException: frozenset({"obj", "with_traceback"}),
    type: frozenset({"mro"}),
    abc.ABCMeta: frozenset({"register"}),
}

_REFUSED_NAMES = frozenset().union(*_REFUSED_ATTRIBUTES.values())
# Built-in types that vals use all the time, none of which forwards attribute access: their
# attribute reads skip `forwards` (every attribute read in a val goes through here).
_PLAIN_TYPES = frozenset(
    {str, bytes, int, float, bool, list, dict, tuple, set, frozenset, bytearray, type(None)}
    | {types.FunctionType, types.BuiltinFunctionType, type, Request, Response}
)

_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
    "&=": operator.iand,
    "|=": operator.ior,
    "^=": operator.ixor,
    "@=": operator.imatmul,
}

# Types whose instances a val may write into. Host tables (a module's dict, a cache) are
# never reachable through the facades (tests/test_facades.py walks them), so a container
# of these types that a val holds is one it made.
_WRITABLE_TYPES = frozenset(
    {dict, list, set, bytearray, collections.Counter, collections.OrderedDict}
    | {collections.defaultdict, collections.deque, collections.ChainMap}
)


class LogBuffer:
    """The captured `print` output of one invocation, capped and marked when cut."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: list[str] = []
        self._size = 0
        self.truncated = False

    def write(self, text: str) -> None:
        if self.truncated:
            return
        room = self.max_bytes - self._size
        encoded = text.encode("utf-8", errors="replace")
        if len(encoded) > room:
            encoded = encoded[:room]
            self.truncated = True
        self._parts.append(encoded.decode("utf-8", errors="ignore"))
        self._size += len(encoded)

    def take(self) -> str:
        """The text so far (with a marker when cut), and start afresh."""
        text = "".join(self._parts)
        if self.truncated:
            text += f"\n[log truncated at {self.max_bytes} bytes]"
        self._parts, self._size, self.truncated = [], 0, False
        return text


class _Printer:
    """What RestrictedPython's rewritten `print(...)` calls: `_print_(_getattr_)._call_print`."""

    __slots__ = ("_log",)

    def __init__(self, log: LogBuffer) -> None:
        self._log = log

    def _call_print(
        self,
        *objects: object,
        sep: str | None = " ",
        end: str | None = "\n",
        file: object = None,
        flush: bool = False,  # accepted and ignored: the log has no buffer to flush
    ) -> None:
        if file is not None:
            # RestrictedPython's own collector would call `file.write`: a val object's
            # method, or a host stream's if one ever leaked. The log is the only output.
            raise TypeError("print(file=...) is not available to vals; print goes to the log")
        out = io.StringIO()
        print(*objects, sep=sep, end=end, file=out)
        self._log.write(out.getvalue())

    def __call__(self) -> str:
        # `printed` in RestrictedPython reads back what this scope printed; the log is the
        # invocation's, so give nothing back rather than another scope's output.
        return ""


class Env(Mapping[str, str]):
    """The owner's env as vals see it: read-only, and holding nothing a val can write to.

    Not a `mappingproxy`: `proxy == obj` compares the proxied dict with `obj`, `dict.__eq__`
    declines a non-dict, and Python calls the reflected `obj.__eq__(that dict)`. A val class's
    `__eq__` (RestrictedPython allows defining it) then holds the dict, which the write guard
    lets it change. `Mapping.__eq__` compares fresh copies, so no dict of ours reaches vals.
    """

    __slots__ = ("_data",)
    _data: dict[str, str]

    def __init__(self, data: Mapping[str, str]) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def copy(self) -> dict[str, str]:
        """A plain dict of the env, as `mappingproxy.copy()` gives: the val's own to change."""
        return dict(self._data)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("env is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("env is read-only")

    def __repr__(self) -> str:
        # Keys only: a repr lands in logs and error messages, env values never may
        # (docs/contract.md §9.3).
        return f"<env keys={sorted(self._data)!r}>"


_NO_DEFAULT = object()


def guarded_getattr(obj: object, name: str, default: object = _NO_DEFAULT) -> object:
    """`_getattr_` for compiled code and the `getattr` builtin; a default covers every refusal."""
    if default is _NO_DEFAULT:
        return _checked_getattr(obj, name)
    try:
        return _checked_getattr(obj, name)
    except AttributeError:
        return default


def _checked_getattr(obj: object, name: str) -> object:
    if type(name) is not str:  # first: a str subclass's methods must not run in here
        raise TypeError("type(name) must be str")
    kind = type(obj)
    if kind not in _PLAIN_TYPES and forwards(kind):
        # `Cls[int].mro` is `Cls.mro`: every check below would look at the wrong object.
        raise AttributeError(
            f"{kind.__name__} objects forward attribute access to another object; "
            "their attributes are not available to vals"
        )
    if name in _REFUSED_NAMES:
        for owner, refused in _REFUSED_ATTRIBUTES.items():
            if name in refused and isinstance(obj, owner):
                raise AttributeError(f"{name!r} is not available to vals")
    if isinstance(obj, types.ModuleType):
        # Facades are never modules; a real module here means a hole elsewhere: don't widen it.
        raise AttributeError("modules are not available to vals")
    if name in _FORMAT_METHODS:
        receiver = str_method_owner(obj, name)
        if receiver == "instance":
            return _FORMAT_METHODS[name](_FORMATTER, cast(str, obj))
        if receiver == "class":
            return unbound_format(_FORMATTER, name)
    if name == "groupindex" and isinstance(obj, re.Pattern):
        # A mappingproxy of the pattern's own dict, and `re` caches compiled patterns for
        # the whole process: a val comparing it with its object (reflected `__eq__`) would
        # get that dict and could rename another user of the pattern's groups. A copy.
        return dict(obj.groupindex)
    value = _restricted_getattr(obj, name)
    # Decided on what the name resolved to, whatever object it came through.
    why = refusal(value)
    if why is not None:
        raise AttributeError(why)
    return value


# str.format and str.format_map, with fields read through `guarded_getattr` (sandbox/shims.py)
# instead of RestrictedPython's flat refusal.
_FORMAT_METHODS: dict[str, type[BoundFormat]] = {
    "format": BoundFormat,
    "format_map": BoundFormatMap,
}
_FORMATTER = ValFormatter(guarded_getattr)


def _public_name(name: object) -> str:
    if type(name) is not str:
        raise TypeError("attribute names must be str")
    if name.startswith("_"):
        raise AttributeError(f"{name!r} starts with '_': vals may not set or delete it")
    return name


def _getitem(obj: Any, key: object) -> object:
    return obj[key]


def _apply(func: Callable[..., object], /, *args: object, **kwargs: object) -> object:
    # Positional-only: `g(**{"func": 1})` must reach g, not collide with this parameter.
    return func(*args, **kwargs)


def _inplacevar(op: str, target: Any, value: Any) -> object:
    return _INPLACE_OPERATORS[op](target, value)


def _metaclass_of(bases: tuple[type, ...]) -> type | None:
    """The most derived metaclass of `bases` (as type() picks it), None for plain `type`."""
    winner: type = type
    for base in bases:
        meta = type(base)
        if issubclass(meta, winner):
            winner = meta
    return None if winner is type else winner


class _ValClasses:
    """Classes the val defined: their instances are the val's own, so it may write to them."""

    def __init__(self) -> None:
        self.classes: weakref.WeakSet[type] = weakref.WeakSet()

    def metaclass(self, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
        # RestrictedPython compiles every class with `metaclass=__metaclass__`, so the body
        # ran into a plain dict. EnumType needs the namespace its `__prepare__` makes (it
        # records members as they are assigned): replay the body's names into one, in order.
        winner = _metaclass_of(bases)
        if winner is not None and issubclass(winner, enum.EnumType):
            prepared = winner.__prepare__(name, bases)
            for key, value in namespace.items():
                prepared[key] = value
            cls: type = winner(name, bases, prepared)
        else:
            cls = type(name, bases, namespace)
        self.classes.add(cls)
        return cls

    def write_guard(self, obj: object) -> object:
        kind = type(obj)
        if forwards(kind):
            # RestrictedPython's wrapper would look for `__guarded_setitem__` through it.
            raise TypeError(f"{kind.__name__} objects cannot be written to")
        if kind in _WRITABLE_TYPES or kind in self.classes:
            return obj
        if isinstance(obj, type) and obj in self.classes:
            return obj
        return full_write_guard(obj)


#: What `import vals.USER.VAL` calls in one module (sandbox.imports): (name, fromlist) -> the
#: object bound.
ValsHook = Callable[[str, Sequence[str] | None], object]
#: Sees a module's compiled code before it runs (sandbox.imports: the vals it will import).
Prefetch = Callable[[types.CodeType], None]
_NO_VAL_IMPORTS = "this code cannot import vals"
#: Globals the sandbox puts in every namespace that are not the val's exports (sandbox.imports).
SANDBOX_GLOBALS = ("env", "Request", "Response")


def make_globals(
    name: str,
    env: Mapping[str, str],
    log: LogBuffer,
    modules: Mapping[str, Facade] = MappingProxyType({}),
    vals: ValsHook | None = None,
) -> dict[str, Any]:
    """A fresh namespace for one val: nothing in it is shared with another val or the host.
    `modules`: facades made for this worker (`std`), importable beside the shared ones;
    `vals`: this module's imports of other vals (sandbox.imports)."""
    val_classes = _ValClasses()

    def import_(
        name: str,
        globals: object = None,
        locals: object = None,
        fromlist: tuple[str, ...] | None = None,
        level: int = 0,
    ) -> object:
        if level == 0 and type(name) is str and (name == "vals" or name.startswith("vals.")):
            if vals is None:
                raise ImportError(_NO_VAL_IMPORTS, name=name)
            return vals(name, fromlist)
        return import_facade(name, fromlist, level, modules)

    safe = {k: v for k, v in safe_builtins.items() if k not in _REMOVED_BUILTINS}

    # The compiler refuses `x._y = v`; these are the run-time doors to the same thing. A
    # dunder planted on a val's class (`__str__`, `__eq__`, `__del__`) would run inside host
    # code that formats or compares the val's objects.
    def setattr_(obj: object, attr: str, value: object) -> None:
        setattr(val_classes.write_guard(obj), _public_name(attr), value)

    def delattr_(obj: object, attr: str) -> None:
        delattr(val_classes.write_guard(obj), _public_name(attr))

    def getattr_(obj: object, attr: str, *default: object) -> object:
        return guarded_getattr(obj, attr, *default)

    def hasattr_(obj: object, attr: str) -> bool:
        try:
            guarded_getattr(obj, attr)
        except AttributeError:
            return False
        return True

    safe.update(_EXTRA_BUILTINS)
    safe.update(
        __import__=import_,
        setattr=setattr_,
        delattr=delattr_,
        getattr=getattr_,
        hasattr=hasattr_,
    )
    return {
        "__builtins__": safe,
        "__name__": name,
        "__metaclass__": val_classes.metaclass,
        "_getattr_": guarded_getattr,
        "_getitem_": _getitem,
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": val_classes.write_guard,
        "_inplacevar_": _inplacevar,
        "_apply_": _apply,
        "_print_": lambda _getattr=None: _Printer(log),
        "Request": Request,
        "Response": Response,
        # A read-only copy: the val cannot change its env nor reach the host's dict.
        "env": Env(env),
    }


@dataclass(frozen=True, slots=True)
class LoadedVal:
    name: str
    export: object


def check_source_size(source: str, max_bytes: int) -> None:
    """Refuse source over the limit (the front end's limits.max_source_bytes), before any
    parsing: the parser's cost grows with it."""
    size = len(source.encode("utf-8", errors="replace"))
    if size > max_bytes:
        raise ValError(f"the source is {size} bytes, over the {max_bytes}-byte limit")


def val_filename(name: str) -> str:
    """The "file" a val's code is compiled as: tracebacks keep only lines of this file."""
    return f"<val {name}>"


# RestrictedPython refuses the async statements by their bare node name; say what to do.
_ASYNC_NODES = ("AsyncFunctionDef", "AsyncFor", "AsyncWith", "Await")
_ASYNC_HINT = " Vals run synchronously: write 'def', not 'async def' (and no 'await')."


def explain_refusal(error: str) -> str:
    """A RestrictedPython refusal ("Line N: ..."), with what to do where it is not obvious."""
    if any(f"{node} statements are not allowed" in error for node in _ASYNC_NODES):
        return error + _ASYNC_HINT
    return error


def compile_refused(errors: Sequence[str]) -> ValError:
    """RestrictedPython's refusals as one error, cut short: a nesting bomb repeats itself."""
    message = "; ".join(map(explain_refusal, errors)) or "the source did not compile"
    return ValError(message if len(message) <= 2000 else message[:2000] + " [...]")


def compile_val(source: str, filename: str) -> types.CodeType:
    """Compile under RestrictedPython. Raises ValError with every problem found."""
    try:
        result = compile_restricted_exec(source, filename=filename)
    except (RecursionError, MemoryError) as exc:
        # Deeply nested source blows up the parser rather than failing as a SyntaxError.
        raise ValError(f"source is too deeply nested to compile ({type(exc).__name__})") from None
    if result.errors or result.code is None:
        raise compile_refused(result.errors)
    code: types.CodeType = result.code
    return code


def run_module(
    source: str,
    filename: str,
    module_name: str,
    env: Mapping[str, str],
    log: LogBuffer,
    modules: Mapping[str, Facade] = MappingProxyType({}),
    vals: ValsHook | None = None,
    prefetch: Prefetch | None = None,
) -> tuple[dict[str, Any], dict[str, object]]:
    """Compile and run an imported val's module (sandbox.imports); its globals, and those of
    them the sandbox put there (`SANDBOX_GLOBALS`, not the val's exports). `prefetch` sees
    the compiled code before it runs."""
    code = compile_val(source, filename)
    if prefetch is not None:
        prefetch(code)
    namespace = make_globals(module_name, env, log, modules, vals)
    hidden = {name: namespace[name] for name in SANDBOX_GLOBALS}
    exec(code, namespace)
    return namespace, hidden


def load_val(
    source: str,
    name: str,
    env: Mapping[str, str],
    log: LogBuffer,
    modules: Mapping[str, Facade] = MappingProxyType({}),
    vals: ValsHook | None = None,
    prefetch: Prefetch | None = None,
) -> LoadedVal:
    """Compile and run the module once; find its export (the top-level name equal to `name`).
    `prefetch` sees the compiled code before it runs (sandbox.imports asks for its imports)."""
    filename = val_filename(name)
    code = compile_val(source, filename)
    if prefetch is not None:
        prefetch(code)
    namespace = make_globals(name, env, log, modules, vals)
    exec(code, namespace)
    if name not in namespace:
        raise ValError(f"the val defines no top-level {name!r} to export")
    return LoadedVal(name, namespace[name])
