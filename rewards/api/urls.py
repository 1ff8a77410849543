from django.urls import path

from annotate.api import urls as _annotate_urls  # noqa: F401  (registers the <project:...> converter)
from rewards.api import views

urlpatterns = [
    path(
        "projects/<project:slug>/reward-jobs/",
        views.RewardJobListCreateView.as_view(),
        name="api-reward-jobs",
    ),
    path(
        "projects/<project:slug>/reward-jobs/<int:job_id>/",
        views.RewardJobDetailView.as_view(),
        name="api-reward-job",
    ),
    path(
        "projects/<project:slug>/reward-jobs/<int:job_id>/cancel/",
        views.RewardJobCancelView.as_view(),
        name="api-reward-job-cancel",
    ),
    path(
        "projects/<project:slug>/reward-models/",
        views.RewardModelListView.as_view(),
        name="api-reward-models",
    ),
    path(
        "projects/<project:slug>/reward-models/<int:number>/",
        views.RewardModelDetailView.as_view(),
        name="api-reward-model",
    ),
    path(
        "projects/<project:slug>/reward-models/<int:number>/activate/",
        views.RewardModelActivateView.as_view(),
        name="api-reward-model-activate",
    ),
    path(
        "projects/<project:slug>/reward-models/<int:number>/scores/",
        views.RewardScoresView.as_view(),
        name="api-reward-scores",
    ),
]
