"""Server-rendered pages (home, labeling page) and access-checked media with HTTP Range."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.views.decorators.http import require_GET

from annotate import selectors
from annotate.errors import ServiceError
from annotate.models import ProjectMember, Sample

# No inline script may run on our pages: untrusted model output is shown there.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)


def with_csp(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response["Content-Security-Policy"] = CSP
        return response

    wrapped.__name__ = view.__name__
    return wrapped


@login_required
@with_csp
def home(request: HttpRequest) -> HttpResponse:
    projects = selectors.projects_of_user(user=request.user)
    # Managers see which of their projects hold comparisons nobody can be served any more.
    managed = [p["slug"] for p in projects if p["role"] == ProjectMember.Role.MANAGER]
    stuck = selectors.comparisons_stuck_counts(slugs=managed) if managed else {}
    for p in projects:
        p["stuck"] = stuck.get(p["slug"], 0)
    return render(request, "home.html", {"projects": projects})


@login_required
@with_csp
def label(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        project, member = selectors.project_for_member(slug=slug, user=request.user)
    except ServiceError as exc:
        raise Http404(exc.message) from exc
    config = {
        "slug": project.slug,
        "name": project.name,
        "instructions": project.instructions,
        "options": {"tie": project.allow_tie, "both_bad": project.allow_both_bad},
        "aspects": project.aspects,
        "mode": project.mode,
        "api": f"/api/projects/{project.slug}/",
        "role": member.role,
    }
    return render(request, "label.html", {"project": project, "config": config})


@login_required
@with_csp
def leaderboard(request: HttpRequest, slug: str) -> HttpResponse:
    """The project's generator versions ranked by rating, with an interval plot (any member)."""
    from annotate.plots import interval_chart

    try:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
    except ServiceError as exc:
        raise Http404(exc.message) from exc
    aspect = request.GET.get("aspect") or None
    if aspect is not None and aspect not in {a["key"] for a in project.aspects}:
        raise Http404("unknown aspect")
    rows = selectors.leaderboard(project=project, aspect=aspect)
    label = {r["version"]: f"{r['generator']} {r['name']}" for r in rows}
    chart = interval_chart(
        [{**r, "label": label[r["version"]]} for r in rows],
        title=f"rating ({aspect or 'overall'}), 95% interval",
    )
    context = {"project": project, "rows": rows, "chart": chart, "aspect": aspect, "aspects": project.aspects}
    return render(request, "leaderboard.html", context)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _file_chunks(path: str, start: int, length: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data


def _media_refusal(status: int, code: str, message: str) -> JsonResponse:
    """The API's error shape, so token clients parse media refusals like any other."""
    response = JsonResponse({"error": {"code": code, "message": message, "details": {}}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Token"
    return response


@require_GET
def sample_media(request: HttpRequest, sample_id: int) -> HttpResponseBase:
    """A sample's file for project members. Supports single byte ranges, which browsers need to
    seek in videos. Files are content-addressed, so clients may cache them for long.

    Refusals: 401 without valid credentials (a missing, malformed or unknown token alike), 404 for
    a missing sample and for anyone outside its project (its existence is not revealed)."""
    if not request.user.is_authenticated:
        # Token clients (the API) authenticate here too.
        from rest_framework.exceptions import AuthenticationFailed

        from annotate.api.auth import CachedTokenAuthentication

        try:
            auth = CachedTokenAuthentication().authenticate(request)  # type: ignore[arg-type]
        except AuthenticationFailed as exc:
            return _media_refusal(401, "authentication_failed", str(exc.detail))
        if auth is None:
            return _media_refusal(401, "not_authenticated", "authentication credentials were not provided")
        request.user = auth[0]
    sample = Sample.objects.select_related("project").filter(id=sample_id).first()
    if sample is None or not sample.media:
        return _media_refusal(404, "not_found", "no such media")
    try:
        selectors.member_role_require(project=sample.project, user=request.user)
    except ServiceError:
        return _media_refusal(404, "not_found", "no such media")
    path = sample.media.path
    size = os.path.getsize(path)
    headers = {
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=31536000, immutable",
        "X-Content-Type-Options": "nosniff",
        "Content-Type": sample.mime_type or "application/octet-stream",
    }
    m = _RANGE.match(request.headers.get("Range", ""))
    if m and (m.group(1) or m.group(2)):
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        else:
            start = max(size - int(m.group(2)), 0)
            end = size - 1
        if start >= size or start > end:
            refused = HttpResponse(status=416)
            refused["Content-Range"] = f"bytes */{size}"
            return refused
        length = end - start + 1
        resp = StreamingHttpResponse(_file_chunks(path, start, length), status=206)
        for k, v in headers.items():
            resp[k] = v
        resp["Content-Range"] = f"bytes {start}-{end}/{size}"
        resp["Content-Length"] = str(length)
        return resp
    full = FileResponse(open(path, "rb"))  # noqa: SIM115 (closed by Django)
    for k, v in headers.items():
        full[k] = v
    full["Content-Length"] = str(size)
    return full
