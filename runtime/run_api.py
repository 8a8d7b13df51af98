"""The Run and Eval APIs (docs/contract.md §4.2, §4.3): handlers that decide who may invoke
what (`runtime.auth`), then invoke (`runtime.invoke`). The parsing of their input is pure and
comes last.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from runtime import strictjson
from runtime.auth import check_names, may_read, optional_user, parse_version
from runtime.config import Config
from runtime.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from runtime.http import HTTPRequest, HTTPResponse
from runtime.invoke import Invoker
from runtime.store import AsyncStore, Store
from sandbox.limits import WorkerLimits

DEFAULT_LIMITS = WorkerLimits()


class RunApi:
    """The handlers of the Run and Eval routes (see `runtime.routes`)."""

    def __init__(self, config: Config, store: AsyncStore, invoker: Invoker) -> None:
        self.config = config
        self.store = store
        self.invoker = invoker

    async def run_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = run_target(params["target"])
        caller = await optional_user(self.store, request)
        args = run_args(request, self.config.limits)
        version = parse_version(request.query_string)
        resolved = await self.store.resolve(owner, name, version)
        if resolved is None or not may_read(resolved[0], caller):
            # Also for a private val that is not the caller's: its existence is not revealed.
            raise NotFoundError(
                f"no val {owner}.{name}" + (f" version {version}" if version else "")
            )
        val, env = resolved
        return await self.invoker.run(val, env, args, caller, origin=request)

    async def eval_code(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        caller = await optional_user(self.store, request)
        if caller is None and not self.config.server.anonymous_eval:
            raise UnauthorizedError(
                "the Eval API needs a token: send 'Authorization: Bearer <token>'"
            )
        await self.invoker.refuse_eval_if_full(caller.name if caller else "")
        code, args = eval_input(request, params.get("code"), self.config.limits)
        check_code_size(code, self.config.limits.max_source_bytes)
        env = await self.store.call(Store.env, caller.name) if caller else {}
        return await self.invoker.eval(code, args, caller, env, origin=request)

    async def preflight(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        # The CORS finalizer adds the allowed origin and methods and mirrors the headers.
        return HTTPResponse(204, cors=True)


# Input: pure.


def run_target(target: str) -> tuple[str, str]:
    """`alice.hello` -> ("alice", "hello")."""
    user, dot, val = target.partition(".")
    if not dot:
        raise BadRequestError(f"expected /v1/run/USER.VAL, not {target!r}", "bad_name")
    check_names(user, val)
    return user, val


def _loads(text: bytes | str, what: str, limits: WorkerLimits = DEFAULT_LIMITS) -> object:
    try:
        return strictjson.loads(text, limits)
    except strictjson.TooManyFieldsError as exc:
        raise BadRequestError(f"{what} is too large to pass on: {exc}", "too_many_fields") from None
    except ValueError as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}", "bad_json") from None


def _args_array(value: object) -> list[object]:
    if not isinstance(value, list):
        raise BadRequestError(
            f'args must be a JSON array (like [1, "two"]), not a JSON {_json_type(value)}',
            "bad_args",
        )
    return value


def _json_type(value: object) -> str:
    names = {dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def query_args(query_string: str, limits: WorkerLimits = DEFAULT_LIMITS) -> list[object] | None:
    """`?args=<JSON array>`; None when absent or empty."""
    values = parse_qs(query_string, keep_blank_values=True).get("args")
    if not values or not values[0].strip():
        return None
    return _args_array(_loads(values[0], "?args", limits))


def run_args(request: HTTPRequest, limits: WorkerLimits = DEFAULT_LIMITS) -> list[object]:
    """Run's args: `?args=` on GET; on POST a body `{"args": [...]}` or a bare JSON array."""
    if request.method != "POST":
        return query_args(request.query_string, limits) or []
    if query_args(request.query_string, limits) is not None:
        raise BadRequestError("on POST, send args in the body, not in ?args=", "bad_args")
    if not request.body.strip():
        return []
    body = _loads(request.body, "the request body", limits)
    if isinstance(body, dict):
        unknown = set(body) - {"args"}
        if unknown:
            raise BadRequestError(
                f'unknown field(s) {", ".join(sorted(unknown))}: send {{"args": [...]}}'
            )
        return _args_array(body.get("args", []))
    return _args_array(body)


def eval_input(
    request: HTTPRequest, path_code: str | None, limits: WorkerLimits = DEFAULT_LIMITS
) -> tuple[str, list[object] | None]:
    """Eval's code and args (None: not given, so a callable value is not called)."""
    if request.method != "POST":
        code, args = path_code or "", query_args(request.query_string, limits)
    else:
        body = _loads(request.body, "the request body", limits)
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            raise BadRequestError('send {"code": "...", "args": [...]} ("args" is optional)')
        unknown = set(body) - {"code", "args"}
        if unknown:
            raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
        code = body["code"]
        args = _args_array(body["args"]) if "args" in body else None
    if not code.strip():
        raise BadRequestError("the code to evaluate is empty")
    return code, args


def check_code_size(code: str, max_bytes: int) -> None:
    if len(code.encode("utf-8", errors="replace")) > max_bytes:
        raise PayloadTooLargeError(f"the code is over the {max_bytes}-byte limit")
