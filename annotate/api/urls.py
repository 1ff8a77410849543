from django.urls import path, register_converter
from django.urls.converters import SlugConverter, get_converters

from annotate.api import views


class ProjectSlugConverter(SlugConverter):
    """A project slug. A converter of our own, so the OpenAPI schema states its pattern (for
    Django's built-in ``slug`` drf-spectacular documents a bare string)."""


if "project" not in get_converters():
    register_converter(ProjectSlugConverter, "project")

urlpatterns = [
    path("auth/token/", views.TokenView.as_view(), name="api-token"),
    path("projects/", views.ProjectListCreateView.as_view(), name="api-projects"),
    path("projects/<project:slug>/", views.ProjectDetailView.as_view(), name="api-project"),
    path("projects/<project:slug>/members/", views.MemberSetView.as_view(), name="api-members"),
    path("projects/<project:slug>/samples/", views.SampleUploadView.as_view(), name="api-samples"),
    path(
        "projects/<project:slug>/comparisons/", views.ComparisonCreateView.as_view(), name="api-comparisons"
    ),
    path("projects/<project:slug>/next/", views.NextView.as_view(), name="api-next"),
    path("projects/<project:slug>/judgments/", views.JudgmentSubmitView.as_view(), name="api-judgments"),
    path("projects/<project:slug>/skip/", views.SkipView.as_view(), name="api-skip"),
    path("projects/<project:slug>/undo/", views.UndoView.as_view(), name="api-undo"),
    path("projects/<project:slug>/progress/", views.ProgressView.as_view(), name="api-progress"),
    path("projects/<project:slug>/leaderboard/", views.LeaderboardView.as_view(), name="api-leaderboard"),
    path(
        "projects/<project:slug>/imports/samples/",
        views.SamplesImportView.as_view(),
        name="api-import-samples",
    ),
    path(
        "projects/<project:slug>/imports/preferences/",
        views.PreferencesImportView.as_view(),
        name="api-import-preferences",
    ),
    path("projects/<project:slug>/export/", views.ExportView.as_view(), name="api-export"),
    path("projects/<project:slug>/snapshots/", views.SnapshotListCreateView.as_view(), name="api-snapshots"),
    path(
        "projects/<project:slug>/snapshots/<int:snapshot_id>/",
        views.SnapshotDetailView.as_view(),
        name="api-snapshot",
    ),
    path(
        "projects/<project:slug>/snapshots/<int:snapshot_id>/download/",
        views.SnapshotDownloadView.as_view(),
        name="api-snapshot-download",
    ),
]
