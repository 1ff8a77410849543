"""Domain errors raised by services and selectors; the API turns them into 4xx responses."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, object] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or {}


class Invalid(ServiceError):
    status = 400
    code = "invalid"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class TooLarge(ServiceError):
    status = 413
    code = "too_large"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"


class Unavailable(ServiceError):
    """A service we depend on (the database, the broker) cannot be reached; retry later."""

    status = 503
    code = "unavailable"
    retry_after = 5
