"""Refusals that apply to every request before any view runs."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse


class QueryStringGuardMiddleware:
    """A NUL character in the query string (``%00``) is a 400 in our error shape: PostgreSQL cannot
    compare or store it, so any view that used the parameter would fail with a 500. Bodies are
    checked by the API's parsers (``annotate.api.parsers``)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
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
