from django.urls import path

from annotate.api import urls as _annotate_urls  # noqa: F401  (registers the <project:...> converter)
from training.api import views

urlpatterns = [
    path("projects/<project:slug>/loop/", views.LoopView.as_view(), name="api-loop"),
    path("projects/<project:slug>/loop/pause/", views.LoopPauseView.as_view(), name="api-loop-pause"),
    path("projects/<project:slug>/loop/resume/", views.LoopResumeView.as_view(), name="api-loop-resume"),
    path("projects/<project:slug>/rl-jobs/", views.RLJobListCreateView.as_view(), name="api-rl-jobs"),
    path("projects/<project:slug>/rl-jobs/<int:job_id>/", views.RLJobDetailView.as_view(), name="api-rl-job"),
    path(
        "projects/<project:slug>/rl-jobs/<int:job_id>/metrics.svg",
        views.RLJobMetricsPlotView.as_view(),
        name="api-rl-job-metrics-plot",
    ),
    path(
        "projects/<project:slug>/rl-jobs/<int:job_id>/cancel/",
        views.RLJobCancelView.as_view(),
        name="api-rl-job-cancel",
    ),
    path(
        "projects/<project:slug>/generator-versions/",
        views.GeneratorModelListCreateView.as_view(),
        name="api-generator-models",
    ),
    path(
        "projects/<project:slug>/sampling-jobs/",
        views.SamplingJobListCreateView.as_view(),
        name="api-sampling-jobs",
    ),
    path(
        "projects/<project:slug>/sampling-jobs/<int:job_id>/",
        views.SamplingJobDetailView.as_view(),
        name="api-sampling-job",
    ),
]
