"""Storage as vals and owners reach it: the answers to a val's `BlobAsk` and `SqlAsk`
(registered with `runtime.broker`), and the owner's management routes:

    GET    /v1/blob?prefix=&after=&limit=   the token user's keys, sorted, at most `limit`
    GET    /v1/blob/{key}                   the value (application/octet-stream)
    PUT    /v1/blob/{key}                   body = the value
    DELETE /v1/blob/{key}
    POST   /v1/sqlite/execute               {"sql", "args"}
    POST   /v1/sqlite/batch                 {"statements": [sql | [sql, args] | {"sql", "args"}]}

A val's storage is its owner's: an ask is answered for `spec.owner`, whatever the val sent.
A refusal is an answer (the val raises `StorageError`), never a broken worker.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qs

from runtime.auth import authenticate, query_int
from runtime.config import StorageConfig
from runtime.errors import (
    BadRequestError,
    HTTPError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    StorageRefusedError,
)
from runtime.http import HTTPRequest, HTTPResponse
from runtime.storage import MAX_LIST, StorageBackend, Usage
from runtime.store import AsyncStore
from sandbox.messages import (
    BlobAnswer,
    BlobAsk,
    MessageError,
    SqlAnswer,
    SqlAsk,
    Statement,
    StorageFault,
    sql_value_from_json,
)

if TYPE_CHECKING:
    from runtime.pool import ValSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
OCTET_STREAM = b"application/octet-stream"

#: How a refusal's type reads on the owner's API.
_STATUS: dict[str, type[HTTPError]] = {
    "value_too_large": PayloadTooLargeError,
    "quota_exceeded": PayloadTooLargeError,
    "busy": OverloadedError,
    "storage_failed": HTTPError,  # 500: valrun's fault, not the request's
}


def http_refusal(error: StorageRefusedError) -> HTTPError:
    cls = _STATUS.get(error.type, BadRequestError)
    headers = (("retry-after", "1"),) if cls is OverloadedError else ()
    return cls(error.message, error.type, headers=headers)


def usage_json(usage: Usage, config: StorageConfig) -> dict[str, object]:
    return {
        "blob_bytes": usage.blob_bytes,
        "blob_keys": usage.blob_keys,
        "max_blob_bytes": config.max_user_bytes,
        "sql_bytes": usage.sql_bytes,
        "max_sql_bytes": config.max_sql_bytes,
    }


class StorageApi:
    def __init__(self, backend: StorageBackend, store: AsyncStore, config: StorageConfig) -> None:
        self.backend = backend
        self.store = store
        self.config = config

    # Asks from vals (runtime.broker)

    async def _fault(self, spec: ValSpec, call: Callable[[str], Awaitable[T]]) -> T | StorageFault:
        if not spec.owner:
            return StorageFault(
                "no_owner", "an Eval without a token has no storage: send a token to use yours"
            )
        try:
            return await call(spec.owner)
        except StorageRefusedError as exc:
            return StorageFault(exc.type, exc.message)
        except (sqlite3.Error, OSError):
            logger.exception("storage failed for %s", spec.owner)
            return StorageFault("storage_failed", "the storage failed; retry later")

    async def answer_blob(self, spec: ValSpec, ask: BlobAsk) -> BlobAnswer:
        backend = self.backend

        async def do(user: str) -> BlobAnswer:
            if ask.action == "get":
                value = await backend.blob_get(user, ask.key)
                return BlobAnswer(ask.id, value is not None, value or b"")
            if ask.action == "set":
                await backend.blob_set(user, ask.key, ask.body)
                return BlobAnswer(ask.id, True)
            if ask.action == "delete":
                return BlobAnswer(ask.id, await backend.blob_delete(user, ask.key))
            entries = await backend.blob_list(user, ask.key, ask.after, ask.limit)
            body = json.dumps([e.to_json() for e in entries], ensure_ascii=False).encode()
            return BlobAnswer(ask.id, True, body)

        answer = await self._fault(spec, do)
        return BlobAnswer(ask.id, error=answer) if isinstance(answer, StorageFault) else answer

    async def answer_sql(self, spec: ValSpec, ask: SqlAsk) -> SqlAnswer:
        async def do(user: str) -> bytes:
            return await self.backend.sql(user, ask.statements, batch=ask.batch)

        answer = await self._fault(spec, do)
        if isinstance(answer, StorageFault):
            return SqlAnswer(ask.id, error=answer)
        return SqlAnswer(ask.id, answer)

    # The owner's API (runtime.routes)

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except StorageRefusedError as exc:
            raise http_refusal(exc) from None

    async def list_blobs(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        query = parse_qs(request.query_string, keep_blank_values=True)
        try:
            limit = query_int(request.query_string, "limit", MAX_LIST) or MAX_LIST
        except ValueError:
            raise BadRequestError(f"limit must be a number from 1 to {MAX_LIST}") from None
        prefix = query.get("prefix", [""])[0]
        after = query.get("after", [""])[0]
        entries = await self._call(self.backend.blob_list(user.name, prefix, after, limit))
        # The next page starts after the last key of a full one.
        next_after = entries[-1].key if len(entries) == limit else None
        return HTTPResponse.json({"blobs": [e.to_json() for e in entries], "next": next_after})

    async def get_blob(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        value = await self._call(self.backend.blob_get(user.name, params["key"]))
        if value is None:
            raise NotFoundError(f"no blob {params['key']!r}")
        return HTTPResponse(200, [(b"content-type", OCTET_STREAM)], value)

    async def put_blob(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        await self._call(self.backend.blob_set(user.name, params["key"], request.body))
        return HTTPResponse.json({"key": params["key"], "size": len(request.body)})

    async def delete_blob(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        if not await self._call(self.backend.blob_delete(user.name, params["key"])):
            raise NotFoundError(f"no blob {params['key']!r}")
        return HTTPResponse.json({"deleted": params["key"]})

    async def execute(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        body = request.json()
        if not isinstance(body, dict) or "sql" not in body or set(body) - {"sql", "args"}:
            raise BadRequestError('send {"sql": "...", "args": [...]}')
        statement = _statement(body)
        results = await self._call(self.backend.sql(user.name, [statement], batch=False))
        # The wire's JSON is the API's ({"$b": base64} for bytes): `[{...}]` -> `{...}`.
        return _json_body(results[1:-1])

    async def batch(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        body = request.json()
        if not isinstance(body, dict) or set(body) != {"statements"}:
            raise BadRequestError('send {"statements": ["...", ["...", [args]], ...]}')
        raw = body["statements"]
        if not isinstance(raw, list):
            raise BadRequestError("statements must be a list")
        statements = [_statement(item) for item in raw]
        results = await self._call(self.backend.sql(user.name, statements, batch=True))
        return _json_body(b'{"results":' + results + b"}")

    async def usage(self, user: str) -> dict[str, object]:
        """For /v1/me."""
        return usage_json(await self._call(self.backend.usage(user)), self.config)


def _json_body(body: bytes) -> HTTPResponse:
    return HTTPResponse(200, [(b"content-type", b"application/json")], body)


def _statement(item: object) -> Statement:
    """`"sql"`, `["sql", [args]]` or `{"sql", "args"}`; bytes args as {"$b": base64}."""
    if isinstance(item, dict):
        item = [item.get("sql"), item.get("args", [])]
    elif isinstance(item, str):
        item = [item, []]
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
        raise BadRequestError('a statement is "sql", ["sql", [args]] or {"sql", "args"}')
    if not isinstance(item[1], list):
        raise BadRequestError("args must be a list")
    try:
        return (item[0], tuple(sql_value_from_json(v) for v in item[1]))
    except MessageError as exc:
        raise BadRequestError(str(exc), "bad_args") from None
