from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from django.views import defaults
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.exceptions import NotFound
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

from annotate import ratelimit
from annotate import views as annotate_views
from training import views as training_views


class SchemaView(SpectacularAPIView):
    """The OpenAPI schema; ``?format=json`` or ``?format=yaml`` picks the encoding (else the Accept
    header does, YAML by default). DRF's own format override is off project-wide (`format` is an
    export parameter), so this view reads it itself."""

    def perform_content_negotiation(self, request: Request, force: bool = False) -> tuple[BaseRenderer, str]:
        wanted = request.query_params.get("format")
        if not wanted:
            return super().perform_content_negotiation(request, force)
        renderers = self.get_renderers()
        for renderer in renderers:
            if renderer.format == wanted:
                return renderer, renderer.media_type
        if force:  # rendering the error below: in JSON
            json_renderer = next(r for r in renderers if r.format == "json")
            return json_renderer, json_renderer.media_type
        raise NotFound(f"no schema format {wanted!r}; use json or yaml")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's ``handler404``: under /api/ (a path no route matches) the API's JSON error shape."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "not_found", "message": f"no such path {request.path!r}", "details": {}}},
            status=404,
        )
    return defaults.page_not_found(request, exception or Exception("not found"))


urlpatterns = [
    path("", annotate_views.home, name="home"),
    # Browsers ask for /favicon.ico on pages that do not link one (admin, API docs).
    path("favicon.ico", RedirectView.as_view(url="/static/favicon.svg", permanent=True)),
    path("label/<slug:slug>/", annotate_views.label, name="label"),
    path("projects/<slug:slug>/leaderboard/", annotate_views.leaderboard, name="leaderboard"),
    path("projects/<slug:slug>/loop/", training_views.loop_page, name="loop"),
    path("media/samples/<int:sample_id>", annotate_views.sample_media, name="sample-media"),
    path("accounts/login/", ratelimit.RateLimitedLoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/schema/", SchemaView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/", include("annotate.api.urls")),
    path("api/", include("rewards.api.urls")),
    path("api/", include("training.api.urls")),
]

# Errors that escape a view or a middleware answer in the API's JSON error shape (503 when the
# database or broker is unreachable), never Django's HTML page.
handler400 = "annotate.api.errors.bad_request"
handler404 = not_found
handler500 = "annotate.api.errors.server_error"
