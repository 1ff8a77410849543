"""Refusals that apply to every request before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class QueryStringGuardMiddleware:
    """A body larger than ``RL_MAX_UPLOAD_BYTES`` is a 413, and a NUL character in the query string (``%00``) is a 400 in our error shape: PostgreSQL cannot
    compare or store it, so any view that used the parameter would fail with a 500. Bodies are
    checked by the API's parsers (``annotate.api.parsers``)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # A body over the upload limit is refused from its Content-Length before anything reads
        # it: the CSRF check of a session request parses the whole multipart body (spooling the
        # files to disk) before any view runs. The views check it again for their own limits.
        length = request.META.get("CONTENT_LENGTH") or ""
        if length.isascii() and length.isdigit() and int(length) > settings.RL_MAX_UPLOAD_BYTES:
            return JsonResponse(
                {
                    "error": {
                        "code": "too_large",
                        "message": f"request is {int(length)} bytes; the upload limit is "
                        f"{settings.RL_MAX_UPLOAD_BYTES} bytes",
                        "details": {},
                    }
                },
                status=413,
            )
        qs = request.META.get("QUERY_STRING", "")
        if qs and ("%00" in qs or "\x00" in qs):
            return JsonResponse(
                {
                    "error": {
                        "code": "invalid",
                        "message": "the query string contains a NUL character",
                        "details": {},
                    }
                },
                status=400,
            )
        return self.get_response(request)
