from django.urls import path

from rewards.api import views

urlpatterns = [
    path(
        "projects/<slug:slug>/reward-jobs/", views.RewardJobListCreateView.as_view(), name="api-reward-jobs"
    ),
    path(
        "projects/<slug:slug>/reward-jobs/<int:job_id>/",
        views.RewardJobDetailView.as_view(),
        name="api-reward-job",
    ),
    path(
        "projects/<slug:slug>/reward-jobs/<int:job_id>/cancel/",
        views.RewardJobCancelView.as_view(),
        name="api-reward-job-cancel",
    ),
    path(
        "projects/<slug:slug>/reward-models/", views.RewardModelListView.as_view(), name="api-reward-models"
    ),
    path(
        "projects/<slug:slug>/reward-models/<int:number>/",
        views.RewardModelDetailView.as_view(),
        name="api-reward-model",
    ),
    path(
        "projects/<slug:slug>/reward-models/<int:number>/activate/",
        views.RewardModelActivateView.as_view(),
        name="api-reward-model-activate",
    ),
    path(
        "projects/<slug:slug>/reward-models/<int:number>/scores/",
        views.RewardScoresView.as_view(),
        name="api-reward-scores",
    ),
]
