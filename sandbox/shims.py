"""Safe stand-ins for stdlib features a val expects but cannot get as they are.

- `str.format` / `str.format_map`: the real ones resolve `{0.attr}` and `{0[key]}` with the
  interpreter's own getattr, past every guard (`'{0.__class__.__base__}'.format(x)`, the class
  of CVE-2023-41039), so RestrictedPython refuses them. `ValFormatter` resolves attributes with
  the policy's guarded getattr (the one `x.attr` in val code compiles to) and items with a plain
  `obj[key]` (what `x[key]` compiles to), so a format field can read exactly what an expression
  in the val could.
- `io.StringIO`: a text buffer in pure Python (for `csv.writer`), not the C `_io` class, whose
  module holds `open`.

Stdlib only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

Getattr = Callable[[object, str], object]


class ValFormatter(string.Formatter):
    """`string.Formatter` whose fields read attributes only through the policy's guard."""

    def __init__(self, guarded_getattr: Getattr) -> None:
        self._getattr = guarded_getattr

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        first, rest = split_field_name(field_name)
        obj = self.get_value(first, args, kwargs)
        for is_attribute, key in rest:
            obj = self._getattr(obj, str(key)) if is_attribute else obj[key]
        return obj, first


def _index(text: str) -> int | str:
    # As str.format reads them: decimal digits are a position or an index, the rest a name.
    return int(text) if text.isascii() and text.isdigit() else text


def split_field_name(field_name: str) -> tuple[int | str, list[tuple[bool, int | str]]]:
    """`'0.a[b][1]'` -> `(0, [(True, 'a'), (False, 'b'), (False, 1)])`, as str.format parses
    a replacement field's name (the C `_string.formatter_field_name_split`). Pure."""
    end = len(field_name)
    i = 0
    while i < end and field_name[i] not in ".[":
        i += 1
    first = _index(field_name[:i])
    rest: list[tuple[bool, int | str]] = []
    while i < end:
        if field_name[i] == ".":
            j = i + 1
            while j < end and field_name[j] not in ".[":
                j += 1
            if j == i + 1:
                raise ValueError("Empty attribute in format string")
            rest.append((True, field_name[i + 1 : j]))
            i = j
        else:  # "["
            j = field_name.find("]", i)
            if j < 0:
                raise ValueError("Missing ']' in format string")
            if j == i + 1:
                raise ValueError("Empty attribute in format string")
            rest.append((False, _index(field_name[i + 1 : j])))
            i = j + 1
            if i < end and field_name[i] not in ".[":
                raise ValueError("Only '.' or '[' may follow ']' in format field specifier")
    return first, rest


class BoundFormat:
    """`template.format` as a val gets it: the same call, through `ValFormatter`."""

    __slots__ = ("_formatter", "_template")

    def __init__(self, formatter: ValFormatter, template: str) -> None:
        self._formatter = formatter
        # An exact str: a val's str subclass must not decide how it is parsed.
        self._template = str.__str__(template)

    def __call__(self, *args: object, **kwargs: object) -> str:
        return self._formatter.vformat(self._template, args, kwargs)

    def __repr__(self) -> str:
        return "<built-in method format of str object>"


class BoundFormatMap(BoundFormat):
    __slots__ = ()

    def __call__(self, mapping: Mapping[str, object]) -> str:  # type: ignore[override]
        return self._formatter.vformat(self._template, (), mapping)

    def __repr__(self) -> str:
        return "<built-in method format_map of str object>"


def unbound_format(formatter: ValFormatter, name: str) -> Callable[..., str]:
    """`str.format` / `str.format_map` read from the class: the template comes first."""
    bound = BoundFormatMap if name == "format_map" else BoundFormat

    def method(template: str, *args: Any, **kwargs: Any) -> str:
        if not isinstance(template, str):
            raise TypeError(f"str.{name} needs a str, not {type(template).__name__}")
        return bound(formatter, template)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def str_method_owner(obj: object, name: str) -> str | None:
    """'instance' or 'class' when `obj.name` would be str's own format method, else None.

    A val's str subclass may define its own `format`; that one is the val's code and stays.
    """
    kind = "class" if isinstance(obj, type) else "instance"
    cls = obj if isinstance(obj, type) else type(obj)
    if not issubclass(cls, str):
        return None
    for klass in cls.__mro__:
        if name in vars(klass):
            return kind if klass is str else None
    return None


class StringIO:
    """The text-buffer part of `io.StringIO`: write, getvalue, read, readline, iterate."""

    __slots__ = ("_length", "_parts", "_position", "_text")

    def __init__(self, initial_value: str = "") -> None:
        if not isinstance(initial_value, str):
            raise TypeError(f"initial_value must be str, not {type(initial_value).__name__}")
        self._text = str.__str__(initial_value)
        self._parts: list[str] = []
        self._length = len(self._text)
        self._position = 0

    def _joined(self) -> str:
        if self._parts:
            self._text += "".join(self._parts)
            self._parts = []
        return self._text

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"string argument expected, got {type(s).__name__!r}")
        text = str.__str__(s)
        if self._position == self._length:
            self._parts.append(text)
        else:  # overwrite from the position, as io.StringIO does after a seek
            whole = self._joined().ljust(self._position, "\0")
            self._text = whole[: self._position] + text + whole[self._position + len(text) :]
        self._position += len(text)
        self._length = max(self._length, self._position)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def getvalue(self) -> str:
        return self._joined()

    def read(self, size: int = -1) -> str:
        whole = self._joined()
        end = len(whole) if size is None or size < 0 else self._position + size
        chunk = whole[self._position : end]
        self._position += len(chunk)
        return chunk

    def readline(self) -> str:
        whole = self._joined()
        end = whole.find("\n", self._position)
        end = len(whole) if end < 0 else end + 1
        line = whole[self._position : end]
        self._position = end
        return line

    def readlines(self) -> list[str]:
        return list(self)

    def seek(self, position: int, whence: int = 0) -> int:
        if whence != 0 or type(position) is not int or position < 0:
            raise ValueError("StringIO.seek takes an absolute position >= 0")
        self._joined()
        self._position = position
        return position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __repr__(self) -> str:
        return f"<StringIO at {self._position}>"
