from django.urls import path

from annotate.api import views

urlpatterns = [
    path("auth/token/", views.TokenView.as_view(), name="api-token"),
    path("projects/", views.ProjectListCreateView.as_view(), name="api-projects"),
    path("projects/<slug:slug>/", views.ProjectDetailView.as_view(), name="api-project"),
    path("projects/<slug:slug>/members/", views.MemberSetView.as_view(), name="api-members"),
    path("projects/<slug:slug>/samples/", views.SampleUploadView.as_view(), name="api-samples"),
    path("projects/<slug:slug>/comparisons/", views.ComparisonCreateView.as_view(), name="api-comparisons"),
    path("projects/<slug:slug>/next/", views.NextView.as_view(), name="api-next"),
    path("projects/<slug:slug>/judgments/", views.JudgmentSubmitView.as_view(), name="api-judgments"),
    path("projects/<slug:slug>/skip/", views.SkipView.as_view(), name="api-skip"),
    path("projects/<slug:slug>/undo/", views.UndoView.as_view(), name="api-undo"),
    path("projects/<slug:slug>/progress/", views.ProgressView.as_view(), name="api-progress"),
    path(
        "projects/<slug:slug>/imports/samples/", views.SamplesImportView.as_view(), name="api-import-samples"
    ),
    path(
        "projects/<slug:slug>/imports/preferences/",
        views.PreferencesImportView.as_view(),
        name="api-import-preferences",
    ),
    path("projects/<slug:slug>/export/", views.ExportView.as_view(), name="api-export"),
    path("projects/<slug:slug>/snapshots/", views.SnapshotListCreateView.as_view(), name="api-snapshots"),
    path(
        "projects/<slug:slug>/snapshots/<int:snapshot_id>/",
        views.SnapshotDetailView.as_view(),
        name="api-snapshot",
    ),
    path(
        "projects/<slug:slug>/snapshots/<int:snapshot_id>/download/",
        views.SnapshotDownloadView.as_view(),
        name="api-snapshot-download",
    ),
]
