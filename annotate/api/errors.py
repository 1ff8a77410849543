"""One JSON error shape for every error: {"error": {"code", "message", "details"}}.

DRF views raise into ``exception_handler``; anything else that escapes a view or a middleware
reaches Django's ``handler500``, which is ``server_error`` here, so no client ever gets Django's
HTML error page. An unreachable database or broker is a 503 with ``Retry-After``, not a 500.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, InterfaceError, OperationalError
from django.http import HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from annotate.errors import ServiceError, Unavailable

logger = logging.getLogger("annotate.api")


def error_response(
    code: str, message: str, status_code: int, details: dict[str, Any] | None = None
) -> Response:
    return Response(
        {"error": {"code": code, "message": message, "details": details or {}}}, status=status_code
    )


def _flatten(detail: Any, prefix: str = "") -> list[str]:
    if isinstance(detail, dict):
        out: list[str] = []
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            out += _flatten(value, f"{prefix}{name}: " if name else prefix)
        return out
    if isinstance(detail, list):
        return [m for item in detail for m in _flatten(item, prefix)]
    return [f"{prefix}{detail}"]


def _unreachable(exc: BaseException) -> bool:
    """The database or the broker/cache could not be reached (or dropped the connection)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    import kombu.exceptions
    import redis.exceptions

    return isinstance(
        exc,
        kombu.exceptions.OperationalError | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError,
    )


def _unavailable_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, OperationalError | InterfaceError):
        # SQLSTATE class 08 (or none: the connection never opened) is the connection itself; the
        # rest of OperationalError is a busy database (deadlock, timeout, serialization failure).
        sqlstate = getattr(getattr(exc.__cause__, "diag", None), "sqlstate", None) or ""
        state = "unreachable" if not sqlstate or sqlstate.startswith("08") else "busy"
        what = f"the database is {state}"
    else:
        what = "the task broker is unreachable"
    return {
        "error": {
            "code": Unavailable.code,
            "message": f"{what}; retry in a few seconds",
            "details": {"retry_after": Unavailable.retry_after},
        }
    }


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ServiceError):
        refused = error_response(exc.code, exc.message, exc.status, exc.details)
        if isinstance(exc, Unavailable):
            refused["Retry-After"] = str(exc.retry_after)
        retry_after = exc.details.get("retry_after")
        if retry_after is not None:
            refused["Retry-After"] = str(retry_after)
        return refused
    if isinstance(exc, DataError):
        # A value the database refused to store (too long, out of range): the client's input. The
        # boundary checks should have caught it; log it so the gap gets a proper check.
        logger.warning("database refused a value: %s", exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid value"
        return error_response("invalid", f"a value cannot be stored: {first}", status.HTTP_400_BAD_REQUEST)
    if _unreachable(exc):
        logger.error("dependency unreachable: %r", exc)
        unavailable = Response(_unavailable_body(exc), status=status.HTTP_503_SERVICE_UNAVAILABLE)
        unavailable["Retry-After"] = str(Unavailable.retry_after)
        return unavailable
    if isinstance(exc, RequestDataTooBig):
        return error_response(
            "too_large", "request body is too large", status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
        )
    if isinstance(exc, DjangoValidationError):
        return error_response("invalid", "; ".join(exc.messages), status.HTTP_400_BAD_REQUEST)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        messages = _flatten(exc.detail)
        return error_response(
            "invalid", "; ".join(messages) or "invalid input", response.status_code, {"fields": exc.detail}
        )
    if isinstance(exc, exceptions.APIException):
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else "error"
        return error_response(str(code), str(exc.detail), response.status_code)
    return response


def server_error(request: HttpRequest) -> JsonResponse:
    """Django's ``handler500``: the exception that escaped (a view, a middleware) as our JSON."""
    exc = sys.exc_info()[1]
    if exc is not None and _unreachable(exc):
        response = JsonResponse(_unavailable_body(exc), status=503)
        response["Retry-After"] = str(Unavailable.retry_after)
        return response
    return JsonResponse(
        {
            "error": {
                "code": "server_error",
                "message": "internal server error; it has been logged",
                "details": {},
            }
        },
        status=500,
    )


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """Django's ``handler400`` (e.g. a disallowed Host header, a malformed multipart body)."""
    return JsonResponse(
        {"error": {"code": "bad_request", "message": "malformed request", "details": {}}}, status=400
    )
