"""Refusals decided on what an attribute resolves to, not on the type of the object read.

A guard that asks "is this object a `str`, a class, an ABC?" before it refuses `format`,
`mro` or `register` is blind to objects that forward attribute access to another object:
`types.GenericAlias` (`Cls[int].mro` is `Cls.mro`, though `Cls[int]` is no class), the `typing`
aliases, weak proxies, `super`, stream and file wrappers. So `sandbox.policy` reads the
attribute first and then refuses by its value: the real `str.format`, a class's `mro`, an
ABC's `register`, `object` and `type` themselves, whatever the object they came through.
And the forwarding types themselves (`FORWARDING_TYPES`, every one the standard library has,
found by tests/test_attacks_tenants.py scanning for types whose attribute lookup is not the
plain one) give vals no attributes at all and are never written to.

Standard library only: this runs inside the worker.
"""

from __future__ import annotations

import _py_abc
import abc
import codecs
import enum
import functools
import string
import types
import typing
import weakref
from collections.abc import Callable
from typing import cast

from sandbox.facades import Facade, ValModule

#: string.Formatter's methods that walk attributes as str.format does.
_FORMATTER_METHODS = ("format", "vformat", "get_field", "get_value")
# Host types whose attribute lookup hands back another object's attributes. Those a val can
# make (`list[int]`, `Cls[int]` for any class with `__class_getitem__`, `int | str`) and
# those it cannot reach today: a new facade member must not open them up.
FORWARDING_TYPES: tuple[type, ...] = (
    types.GenericAlias,  # -> its origin class
    types.UnionType,  # holds classes; refused with its kin
    typing._BaseGenericAlias,  # type: ignore[attr-defined]  # -> its origin: typing.List[int]
    typing._SpecialForm,
    weakref.ProxyType,  # -> its referent
    weakref.CallableProxyType,
    super,  # -> the next class in the MRO
    types.MethodType,  # -> its function
    codecs.StreamReader,  # -> the wrapped stream
    codecs.StreamWriter,
    codecs.StreamReaderWriter,
    codecs.StreamRecoder,
)


_FORWARDING = frozenset(FORWARDING_TYPES)
#: Classes whose Python `__getattr__` looks up only their own members: the facades', an
#: imported val's (its exports), and the enum metaclass's (Python 3.11: a member by name,
#: from the class's own member map).
_OWN_LOOKUP = frozenset({Facade, ValModule, enum.EnumType})


def _forwards(kind: type) -> bool:
    """True for a forwarding type: one of FORWARDING_TYPES, or any other class with an
    attribute hook written in Python (`tempfile`'s and `os.popen`'s file wrappers, ...),
    which vals cannot write (RestrictedPython refuses the `_` names) and which, but for the
    facades' own, can hand back anything."""
    for klass in kind.__mro__:  # set and dict lookups: this runs on every attribute read
        if klass in _FORWARDING:
            return True
        namespace = klass.__dict__
        if "__getattr__" in namespace:
            return klass not in _OWN_LOOKUP
        if type(namespace.get("__getattribute__")) is types.FunctionType:
            return True
    return False


# Cached: it runs on every attribute read. A type cannot start forwarding later: the hook
# names start with `_`, which vals can neither define nor set.
forwards = cast(Callable[[type], bool], functools.lru_cache(maxsize=1024)(_forwards))


def _ids(*objects: object) -> frozenset[int]:
    return frozenset(id(o) for o in objects)


# Unbound callables a val must never hold: each walks or writes what the guards protect.
# Identities, not equality: a val object's `__eq__` must not run in here. The objects live
# as long as the process, so their ids stay theirs.
_REFUSED_CALLABLES = _ids(
    str.format,  # walks attributes in C: "{0.__class__.__mro__}".format(x)
    str.format_map,
    type.__dict__["mro"],  # leads to `object`, the start of every subclass walk
    abc.ABCMeta.register,  # writes into the process-wide ABC registry
    _py_abc.ABCMeta.register,
    BaseException.with_traceback,
    *(getattr(string.Formatter, name) for name in _FORMATTER_METHODS),
)
_REFUSED = _REFUSED_CALLABLES | _ids(object, type)
# What most attribute reads give: never one of the refused objects.
_INERT = frozenset({str, bytes, int, float, bool, type(None), tuple, list, dict})
# Bound built-in methods are made afresh on each read: known by their name and their owner.
_REFUSED_BOUND: dict[str, Callable[[object], bool]] = {
    "format": lambda owner: isinstance(owner, str),
    "format_map": lambda owner: isinstance(owner, str),
    "mro": lambda owner: isinstance(owner, type),
    "with_traceback": lambda owner: isinstance(owner, BaseException),
}


def refusal(value: object) -> str | None:
    """Why a val may not hold `value` (an attribute it read), or None if it may."""
    kind = type(value)
    if kind in _INERT:
        return None
    if kind is types.BuiltinMethodType:  # a bound method of a C class, made on each read
        name: str = value.__name__  # type: ignore[attr-defined]  # always there on this type
        check = _REFUSED_BOUND.get(name)
        if check is not None and check(value.__self__):  # type: ignore[attr-defined]
            return f"{name!r} is not available to vals"
        return None
    if kind is types.MethodType:
        value = value.__func__  # type: ignore[attr-defined]  # always there on this type
    if id(value) in _REFUSED:
        return f"{value!r} is not available to vals"
    return None
