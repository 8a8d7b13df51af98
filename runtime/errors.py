"""Errors on the front end. Each HTTP error knows its status and its snake_case type
(docs/contract.md §8); the app turns any of them into the one JSON error shape, in one place.

    ValrunError
    ├── ConfigError                 valrun.toml or the command line is wrong (no status)
    ├── StoreError                  the store refused an operation (no status: the HTTP layer
    │   │                           maps each to one with `http_error`)
    │   ├── InvalidError            a value the store cannot hold (a name, a privacy)  -> 400
    │   ├── ExistsError             a thing that must be new exists already           -> 409
    │   ├── MissingError            a thing that must exist does not                  -> 404
    │   ├── QuotaError              a per-user limit is reached (runtime.quotas)       -> 409
    │   ├── RefusedError            the thing exists, but its state forbids this      -> 409
    │   ├── StorageFullError        the store's disk is full                          -> 507
    │   └── StoreUnavailableError   the store cannot be written (read-only, failing)  -> 503
    ├── StorageRefusedError         a blob or SQL call refused (quota, bad key, SQL error):
    │                               the val gets a StorageError, the API maps its `type`
    ├── StartupError                valrun cannot start here: port, database, disk (no status)
    └── HTTPError                   anything that becomes an error response
        ├── BadRequestError         400 bad_request, bad_json, bad_name, bad_host
        ├── UnauthorizedError       401 unauthorized
        ├── ForbiddenError          403 forbidden
        ├── NotFoundError           404 not_found, unknown_host
        ├── MethodNotAllowedError   405 method_not_allowed
        ├── RequestTimeoutError     408 body_timeout (the body came too slowly)
        ├── ConflictError           409 conflict
        ├── PayloadTooLargeError    413 request_too_large
        ├── TooManyRequestsError    429 too_many_requests (with Retry-After)
        ├── HeadersTooLargeError    431 headers_too_large
        ├── ClientGoneError         499 client_gone (nobody reads it: for logs and metrics)
        ├── OverloadedError         503 overloaded (with Retry-After)
        ├── StoreUnavailableHTTPError 503 store_unavailable (read-only or failing disk)
        ├── WorkerTimeoutError      504 timeout
        ├── InsufficientStorageError 507 storage_full (the store's disk is full)
        └── WorkerError             502 val_error, memory_limit, response_too_large,
                                        bad_response, worker_crashed, protocol_error
"""

from __future__ import annotations


class ValrunError(Exception):
    pass


class ConfigError(ValrunError):
    pass


class StoreError(ValrunError):
    def __init__(self, message: str, type: str) -> None:
        super().__init__(message)
        self.message = message
        self.type = type


class InvalidError(StoreError):
    pass


class ExistsError(StoreError):
    pass


class MissingError(StoreError):
    pass


class QuotaError(StoreError):
    """A per-user limit: `quota` names it (a config key) and `limit` is its value; both are
    fields of the error answer when given (runtime.quotas)."""

    def __init__(
        self, message: str, type: str, *, quota: str | None = None, limit: int | None = None
    ) -> None:
        super().__init__(message, type)
        self.quota = quota
        self.limit = limit


class RefusedError(StoreError):
    pass


class StorageFullError(StoreError):
    def __init__(self, message: str, type: str = "storage_full") -> None:
        super().__init__(message, type)


class StoreUnavailableError(StoreError):
    def __init__(self, message: str, type: str = "store_unavailable") -> None:
        super().__init__(message, type)


class StorageRefusedError(ValrunError):
    """A blob or SQL call that changed nothing: `type` says why (runtime.storage)."""

    def __init__(self, message: str, type: str) -> None:
        super().__init__(message)
        self.message = message
        self.type = type


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


class RequestTimeoutError(HTTPError):
    status, default_type = 408, "body_timeout"


class ConflictError(HTTPError):
    status, default_type = 409, "conflict"


class PayloadTooLargeError(HTTPError):
    status, default_type = 413, "request_too_large"


class TooManyRequestsError(HTTPError):
    status, default_type = 429, "too_many_requests"


class HeadersTooLargeError(HTTPError):
    status, default_type = 431, "headers_too_large"


class ClientGoneError(HTTPError):
    # nginx's 499: the client closed the connection before its request was complete.
    status, default_type = 499, "client_gone"


class OverloadedError(HTTPError):
    status, default_type = 503, "overloaded"


class StoreUnavailableHTTPError(HTTPError):
    status, default_type = 503, "store_unavailable"


class WorkerTimeoutError(HTTPError):
    status, default_type = 504, "timeout"


class InsufficientStorageError(HTTPError):
    # RFC 4918 §11.5: the server cannot store what the request needs (a full disk).
    status, default_type = 507, "storage_full"


class WorkerError(HTTPError):
    """The worker failed this request: the val raised, or the worker broke a rule."""

    status, default_type = 502, "worker_crashed"
    #: What the val printed before it failed, when the failure came with no reply to carry it
    #: (a val that raised while its module loaded).
    log = ""
    #: The val failed while it loaded (did not compile, or its module raised): the message
    #: may quote its source, so only its owner sees it (runtime.invoke).
    during_load = False


#: The HTTP answer to each kind of store refusal; a StoreError of no listed kind is a 500.
HTTP_FOR_STORE: tuple[tuple[type[StoreError], type[HTTPError]], ...] = (
    (InvalidError, BadRequestError),
    (ExistsError, ConflictError),
    (QuotaError, ConflictError),
    (RefusedError, ConflictError),
    (MissingError, NotFoundError),
    (StorageFullError, InsufficientStorageError),
    (StoreUnavailableError, StoreUnavailableHTTPError),
)


def http_error(error: StoreError) -> HTTPError:
    """The HTTP answer to a store's refusal, with the store's type and message."""
    cls = next((http for store, http in HTTP_FOR_STORE if isinstance(error, store)), HTTPError)
    # The disk's state, not the request's: a client may retry later.
    retry = cls in (InsufficientStorageError, StoreUnavailableHTTPError)
    details: dict[str, object] = {}
    if isinstance(error, QuotaError) and error.quota is not None:
        details = {"quota": error.quota, "limit": error.limit}
    headers = (("retry-after", "60"),) if retry else ()
    return cls(error.message, error.type, headers=headers, details=details)
