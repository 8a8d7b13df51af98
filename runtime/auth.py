"""Who is asking and what they may see: authentication, authorization, and the query
parameters every route shares. Pure but for `authenticate`, which asks the store.

Who may do what, by privacy. A private val is invisible to everyone but its owner: 404, never
403, so its existence is not revealed.

                     public        unlisted      private
    run (Run API)    anyone        anyone        owner (others 404)
    read code        anyone        anyone        owner (others 404)
    listed           to anyone     to owner      to owner
    write            owner (another user 403, no token 401)
    read records     owner (another user 403; for a private val 404; no token 401)
    web endpoint     anyone        anyone        anyone (the code is private, not the endpoint)
"""

from __future__ import annotations

from urllib.parse import parse_qs

from runtime.errors import BadRequestError, ForbiddenError, UnauthorizedError
from runtime.hosts import USER_RE, VAL_RE
from runtime.http import HTTPRequest
from runtime.store import AsyncStore, User, ValVersion

DEFAULT_RUNS_LIMIT = 100
MAX_RUNS_LIMIT = 1000


async def authenticate(store: AsyncStore, request: HTTPRequest) -> User:
    """The token's user; 401 without a valid token."""
    header = request.header("authorization")
    if header is None:
        raise UnauthorizedError("this needs a token: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    user = None
    if scheme.lower() == "bearer" and token.strip():
        user = await store.user_for_token(token.strip())
    if user is None:
        raise UnauthorizedError("the token is not valid (revoked, mistyped or expired)")
    return user


async def optional_user(store: AsyncStore, request: HTTPRequest) -> User | None:
    """The token's user, None without a token; a token that is sent must be valid (401)."""
    if request.header("authorization") is None:
        return None
    return await authenticate(store, request)


async def owner_only(store: AsyncStore, request: HTTPRequest, owner: str) -> User:
    """The token's user, who must be `owner`: 401 without a valid token, 403 for another."""
    user = await authenticate(store, request)
    if user.name != owner:
        raise ForbiddenError(f"only {owner} may change {owner}'s vals")
    return user


def check_names(user: str, val: str | None = None) -> None:
    if not USER_RE.fullmatch(user):
        raise BadRequestError(
            f"{user!r} is not a valid username: lower-case letters, digits and _, "
            "starting with a letter, at most 39 characters",
            "bad_name",
        )
    if val is not None and not VAL_RE.fullmatch(val):
        raise BadRequestError(
            f"{val!r} is not a valid val name: letters, digits and _, starting with a letter, "
            "at most 48 characters",
            "bad_name",
        )


def may_read(val: ValVersion, caller: User | None) -> bool:
    """Whether `caller` may run the val through the API and read its code and versions."""
    return val.privacy != "private" or (caller is not None and caller.name == val.owner)


def query_int(query_string: str, key: str, high: int) -> int | None:
    """`?key=N` with 1 <= N <= high; None when absent; ValueError when anything else.
    `isascii` first: str.isdigit accepts '²', which int() refuses."""
    if not query_string:  # most requests: nothing to parse
        return None
    values = parse_qs(query_string).get(key)
    if not values:
        return None
    text = values[0]
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= high):
        raise ValueError(text)
    return int(text)


def parse_limit(query_string: str) -> int:
    try:
        limit = query_int(query_string, "limit", MAX_RUNS_LIMIT)
    except ValueError:
        raise BadRequestError(f"limit must be a number from 1 to {MAX_RUNS_LIMIT}") from None
    return DEFAULT_RUNS_LIMIT if limit is None else limit


def parse_version(query_string: str) -> int | None:
    """`?v=N` pins a version; absent means the latest."""
    try:
        return query_int(query_string, "v", 2**31 - 1)
    except ValueError as exc:
        raise BadRequestError(
            f"v must be a version number (1, 2, ...), not {exc.args[0]!r}", "bad_version"
        ) from None
