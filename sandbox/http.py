"""`Request` and `Response`: the objects val code sees, with the Fetch API's names.

Everything here is handed to untrusted code, so each class keeps its state in underscore slots
(RestrictedPython refuses `_` attributes at compile time), holds only plain values (str, bytes,
tuples), and never a reference to a host object: there is nothing to walk back from. The
classes refuse subclasses: the worker reads a Response's `status`, `body` and `header_pairs()`
after the val's code has returned, and a val's override there would run outside the val's
error handling and skip the checks in `__init__`. Strings from vals are copied to exact `str`
before use, so a `str` subclass's own `lower()` or `encode()` never decides anything here.
"""

from __future__ import annotations

import json as _json
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar

from sandbox.fields import loads_json, parse_fields
from sandbox.limits import WorkerLimits
from sandbox.multipart import Part, parse_multipart

JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
BYTES_TYPE = "application/octet-stream"
# RFC 9110 §15.3.5, §15.3.6, §15.4.5: these responses end at their header section. With a
# body the front end would still send its Content-Length, and a proxy that trusts it on a
# 204 takes the next response's first bytes as this body. Fetch refuses them too.
NULL_BODY_STATUSES = frozenset({204, 205, 304})


class _MultiMap:
    """A read-only multi-value mapping (the Fetch API's `URLSearchParams`/`Headers` habits)."""

    __slots__ = ("_items",)
    _items: tuple[tuple[str, str], ...]
    _fold: ClassVar[bool] = False

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        fold = type(self)._fold
        pairs = tuple((k.lower() if fold else k, v) for k, v in items)
        object.__setattr__(self, "_items", pairs)

    def _key(self, name: str) -> str:
        return name.lower() if self._fold else name

    def getall(self, name: str) -> list[str]:
        key = self._key(name)
        return [v for k, v in self._items if k == key]

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for k, _ in self._items))

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: str | None = None) -> str | None:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k == self._key(name) for k, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._items)!r})"


def _exact_str(text: str) -> str:
    # `str.__str__` copies a subclass's characters into a plain str and calls none of its
    # methods (a val's `str` subclass may define `lower`, `encode`, `startswith`, ...).
    return str.__str__(text)


class Query(_MultiMap):
    """Query parameters; `get` gives the first value, as `URLSearchParams.get` does."""

    __slots__ = ()
    _fold = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Query cannot be subclassed")

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.getall(name)
        return values[0] if values else default


class Headers(_MultiMap):
    """Case-insensitive headers; `get` joins repeated values with ", " as `Headers.get` does."""

    __slots__ = ()
    _fold = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Headers cannot be subclassed")

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.getall(name)
        return ", ".join(values) if values else default


class UploadedFile:
    """A file sent in a multipart form: `name` (the form field), `filename`, `content_type`,
    `body` (bytes), `size`, `text()`."""

    __slots__ = ("_part",)

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("UploadedFile cannot be subclassed")

    def __init__(self, part: Part) -> None:
        self._part = part

    name = property(lambda self: self._part.name)
    filename = property(lambda self: self._part.filename)
    content_type = property(lambda self: self._part.content_type)
    body = property(lambda self: self._part.body)
    size = property(lambda self: len(self._part.body))

    def text(self) -> str:
        return self._part.body.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"<UploadedFile {self._part.name}={self._part.filename!r}, {self.size} bytes>"


class Form(_MultiMap):
    """A form's text fields (`get` gives the first value, as for the query) and its `files`:
    `files` is a list of UploadedFile, `file(name)` the first one sent as field `name`."""

    __slots__ = ("_files",)
    _files: tuple[UploadedFile, ...]
    _fold = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Form cannot be subclassed")

    def __init__(
        self, items: Iterable[tuple[str, str]] = (), files: Iterable[UploadedFile] = ()
    ) -> None:
        super().__init__(items)
        object.__setattr__(self, "_files", tuple(files))

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.getall(name)
        return values[0] if values else default

    @property
    def files(self) -> list[UploadedFile]:
        return list(self._files)

    def file(self, name: str) -> UploadedFile | None:
        return next((f for f in self._files if f.name == name), None)


_DEFAULT_LIMITS = WorkerLimits()


class Request:
    __slots__ = ("_body", "_headers", "_limits", "_method", "_path", "_query", "_url")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Request cannot be subclassed")

    def __init__(
        self,
        method: str,
        url: str,
        path: str,
        query_string: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        limits: WorkerLimits = _DEFAULT_LIMITS,
    ) -> None:
        self._limits = limits
        self._method = method
        self._url = url
        self._path = path
        self._query = Query(parse_fields(query_string, limits.max_request_fields))
        self._headers = Headers(headers)
        self._body = body

    method = property(lambda self: self._method)
    url = property(lambda self: self._url)
    path = property(lambda self: self._path)
    query = property(lambda self: self._query)
    headers = property(lambda self: self._headers)
    body = property(lambda self: self._body)

    def text(self) -> str:
        return self._body.decode("utf-8", errors="replace")

    def json(self) -> object:
        limits = self._limits
        return loads_json(self._body, limits.max_json_keys, limits.max_json_object_keys)

    def form(self) -> Form:
        """The fields of a form: `multipart/form-data` (fields and `files`) or, for any other
        Content-Type, `application/x-www-form-urlencoded`. ValueError if it is malformed."""
        content_type = self._headers.get("content-type") or ""
        if content_type.lower().startswith("multipart/form-data"):
            parts = parse_multipart(self._body, content_type)
            return Form(
                [(p.name, p.body.decode("utf-8", errors="replace")) for p in parts if not p.file],
                [UploadedFile(p) for p in parts if p.file],
            )
        return Form(parse_fields(self.text(), self._limits.max_request_fields, "form"))

    def __repr__(self) -> str:
        return f"<Request {self._method} {self._url}>"


HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]] | None


def _header_pairs(headers: HeaderInput) -> tuple[tuple[str, str], ...]:
    if headers is None:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    pairs = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError("Response headers must be a mapping or a list of (name, value) pairs")
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str | int):
            raise TypeError(f"header {name!r}: names must be str and values str or int")
        pairs.append(
            (_exact_str(name), _exact_str(value) if isinstance(value, str) else str(value))
        )
    return tuple(pairs)


def _has_header(pairs: Iterable[tuple[str, str]], name: str) -> bool:
    return any(k.lower() == name for k, _ in pairs)


class Response:
    """`Response(body="", status=200, headers=None)`; `Response.json(...)`; `.redirect(...)`."""

    __slots__ = ("_body", "_headers", "_status")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Response cannot be subclassed")

    def __init__(self, body: str | bytes = "", status: int = 200, headers: HeaderInput = None):
        if type(status) is not int or not 200 <= status <= 599:
            raise ValueError(f"Response status must be an int from 200 to 599, not {status!r}")
        pairs = _header_pairs(headers)
        if isinstance(body, str):
            if body and not _has_header(pairs, "content-type"):
                pairs += (("content-type", TEXT_TYPE),)
            body = str.encode(body)
        elif not isinstance(body, bytes | bytearray):
            raise TypeError(f"Response body must be str or bytes, not {type(body).__name__}")
        if body and status in NULL_BODY_STATUSES:
            raise ValueError(f"a {status} response cannot have a body; use Response('', {status})")
        self._body = bytes(body)
        self._status = status
        self._headers = pairs

    @classmethod
    def json(cls, obj: object, status: int = 200, headers: HeaderInput = None) -> Response:
        pairs = _header_pairs(headers)
        if not _has_header(pairs, "content-type"):
            pairs += (("content-type", JSON_TYPE),)
        return cls(dumps_json(obj).encode(), status, pairs)

    @classmethod
    def redirect(cls, url: str, status: int = 302) -> Response:
        if status not in (301, 302, 303, 307, 308):
            raise ValueError(f"redirect status must be 301, 302, 303, 307 or 308, not {status!r}")
        return cls(b"", status, [("location", str(url))])

    status = property(lambda self: self._status)
    headers = property(lambda self: Headers(self._headers))
    body = property(lambda self: self._body)

    def header_pairs(self) -> list[list[str]]:
        return [[k, v] for k, v in self._headers]

    def __repr__(self) -> str:
        return f"<Response {self._status}, {len(self._body)} bytes>"


def dumps_json(obj: object) -> str:
    # allow_nan=False: NaN and Infinity are not JSON, and browsers' JSON.parse rejects them.
    return _json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def to_response(value: object) -> Response:
    """Turn what an HTTP val returned into a Response (docs/contract.md §2.2)."""
    if isinstance(value, Response):
        return value
    if isinstance(value, str):
        return Response(str.encode(value), 200, [("content-type", HTML_TYPE)])
    if isinstance(value, bytes | bytearray):
        return Response(bytes(value), 200, [("content-type", BYTES_TYPE)])
    if isinstance(value, dict | list):
        return Response.json(value)
    raise TypeError(
        f"an HTTP val must return a Response, str, bytes, dict or list, not {type(value).__name__}"
    )
