"""Bounds on what one request can make a val hash: query and form fields, JSON object keys.

Every key a request carries ends up in a dict or set somewhere (`req.query.keys()`,
`req.json()`, Run's args), and a dict of n keys whose hashes collide costs n² to build. The
hash secret that makes collisions hard to find is each worker's own (docs/contract.md §15),
so these bounds are the second wall: even keys that collide cost at most a bounded amount.
Standard library only: the worker (Request) and the front end (client JSON) both use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qsl


class TooManyFieldsError(ValueError):
    """A request carries more fields or keys than the limits allow."""


def count_fields(text: str) -> int:
    """How many fields `parse_qsl` would find in a query string or form body, at most."""
    return text.count("&") + 1 if text else 0


def parse_fields(text: str, max_fields: int, what: str = "query") -> list[tuple[str, str]]:
    """`parse_qsl(text)` with blank values kept; TooManyFieldsError over `max_fields`."""
    fields = count_fields(text)
    if fields > max_fields:
        raise TooManyFieldsError(
            f"the {what} has {fields} fields, over the limit of {max_fields} "
            "(limits.max_request_fields)"
        )
    return parse_qsl(text, keep_blank_values=True)


def key_counter(
    max_keys: int, max_object_keys: int
) -> Callable[[list[tuple[str, object]]], dict[str, object]]:
    """An `object_pairs_hook` for json.loads that refuses a document with more than
    `max_keys` object keys in all, or an object with more than `max_object_keys`. It sees each
    object's pairs before they are hashed into a dict."""
    total = 0

    def build(pairs: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal total
        total += len(pairs)
        if len(pairs) > max_object_keys:
            raise TooManyFieldsError(
                f"a JSON object has {len(pairs)} keys, over the limit of {max_object_keys} "
                "(limits.max_json_object_keys)"
            )
        if total > max_keys:
            raise TooManyFieldsError(
                f"the JSON has over {max_keys} object keys in all (limits.max_json_keys)"
            )
        return dict(pairs)

    return build


def loads_json(text: str | bytes, max_keys: int, max_object_keys: int, **kwargs: object) -> object:
    """json.loads with the key bounds; keyword arguments go to json.loads."""
    hook = key_counter(max_keys, max_object_keys)
    return json.loads(text, object_pairs_hook=hook, **kwargs)  # type: ignore[arg-type]
