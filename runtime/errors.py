"""Errors on the front end. Each knows its HTTP status and its snake_case type (SPEC §7); the
app turns any of them into the one JSON error shape, in one place.

    ValrunError
    ├── ConfigError                 valrun.toml or the command line is wrong (no status)
    ├── StartupError                valrun cannot start here: port, database, disk (no status)
    └── HTTPError                   anything that becomes an error response
        ├── BadRequestError         400 bad_request, bad_json, bad_name, bad_host
        ├── UnauthorizedError       401 unauthorized
        ├── ForbiddenError          403 forbidden
        ├── NotFoundError           404 not_found, unknown_host
        ├── MethodNotAllowedError   405 method_not_allowed
        ├── ConflictError           409 conflict
        ├── PayloadTooLargeError    413 request_too_large
        ├── HeadersTooLargeError    431 headers_too_large
        ├── ClientGoneError         499 client_gone (nobody reads it: for logs and metrics)
        ├── OverloadedError         503 overloaded (with Retry-After)
        ├── StoreUnavailableError   503 store_unavailable (read-only or failing disk)
        ├── StorageFullError        507 storage_full (the store's disk is full)
        ├── WorkerTimeoutError      504 timeout
        └── WorkerError             502 val_error, memory_limit, response_too_large,
                                        bad_response, worker_crashed, protocol_error
"""

from __future__ import annotations


class ValrunError(Exception):
    pass


class ConfigError(ValrunError):
    pass


class StartupError(ValrunError):
    pass


class HTTPError(ValrunError):
    status = 500
    default_type = "internal_error"

    def __init__(
        self,
        message: str,
        type: str | None = None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.default_type
        self.headers = headers
        self.details = details or {}

    def body(self) -> dict[str, object]:
        return {"error": {"type": self.type, "message": self.message, **self.details}}


class BadRequestError(HTTPError):
    status, default_type = 400, "bad_request"


class UnauthorizedError(HTTPError):
    status, default_type = 401, "unauthorized"


class ForbiddenError(HTTPError):
    status, default_type = 403, "forbidden"


class NotFoundError(HTTPError):
    status, default_type = 404, "not_found"


class MethodNotAllowedError(HTTPError):
    status, default_type = 405, "method_not_allowed"


class ConflictError(HTTPError):
    status, default_type = 409, "conflict"


class PayloadTooLargeError(HTTPError):
    status, default_type = 413, "request_too_large"


class HeadersTooLargeError(HTTPError):
    status, default_type = 431, "headers_too_large"


class ClientGoneError(HTTPError):
    # nginx's 499: the client closed the connection before its request was complete.
    status, default_type = 499, "client_gone"


class OverloadedError(HTTPError):
    status, default_type = 503, "overloaded"


class StoreUnavailableError(HTTPError):
    status, default_type = 503, "store_unavailable"


class StorageFullError(HTTPError):
    # RFC 4918 §11.5: the server cannot store what is needed to complete the request.
    status, default_type = 507, "storage_full"


class WorkerTimeoutError(HTTPError):
    status, default_type = 504, "timeout"


class WorkerError(HTTPError):
    """The worker failed this request: the val raised, or the worker broke a rule."""

    status, default_type = 502, "worker_crashed"
    #: What the val printed before it failed, when the failure came with no reply to carry it
    #: (a val that raised while its module loaded).
    log = ""
