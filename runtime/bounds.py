"""What one request to a val's host may make the val hash, checked before any worker is used.

The worker bounds the same counts itself (sandbox.fields: `req.query`, `req.form()`,
`req.json()`), which answers too many fields as the val's error; here they are the client's
error, with a status that says so: 400 for query and form fields (header lines are
bounded for every request, by runtime.headers: 431).
"""

from __future__ import annotations

from runtime.config import LimitsConfig
from runtime.errors import BadRequestError
from runtime.http import HTTPRequest
from sandbox.fields import count_fields

FORM_TYPE = b"application/x-www-form-urlencoded"


def check_request_fields(request: HTTPRequest, limits: LimitsConfig) -> None:
    # Header lines are bounded before this, for every request (runtime.headers).
    fields = count_fields(request.query_string)
    if fields > limits.max_request_fields:
        raise BadRequestError(
            f"the query has {fields} parameters, over the limit of {limits.max_request_fields} "
            "(limits.max_request_fields)",
            "too_many_fields",
        )
    content_type = request.header("content-type") or ""
    if content_type.split(";")[0].strip().lower().encode() == FORM_TYPE:
        fields = request.body.count(b"&") + 1 if request.body else 0
        if fields > limits.max_request_fields:
            raise BadRequestError(
                f"the form has {fields} fields, over the limit of {limits.max_request_fields} "
                "(limits.max_request_fields)",
                "too_many_fields",
            )
