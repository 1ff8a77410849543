"""REST API of the rewards app: launch, watch and cancel training jobs; list versions, activate one,
read scores. Thin views: parse, call a service, render. Permissions are checked by the services
(managers launch, cancel and activate; any member reads)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotate import selectors
from annotate.errors import NotFound
from annotate.models import DatasetSnapshot
from rewards import services
from rewards.models import RewardModelVersion, RewardTrainingJob, SampleScore


def version_of(job: RewardTrainingJob) -> RewardModelVersion | None:
    """The job's version (load jobs with ``select_related("version")`` to avoid a query each)."""
    try:
        return job.version
    except RewardModelVersion.DoesNotExist:
        return None


def job_out(job: RewardTrainingJob) -> dict[str, Any]:
    version = version_of(job)
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "trigger": job.trigger,
        "encoder": {"name": job.encoder.name, "family": job.encoder.family, "path": job.encoder_path},
        "snapshot": job.snapshot_id,
        "config": job.config,
        "holdout": job.holdout,
        "device": job.device,
        "progress": job.progress,
        "cancel_requested": job.cancel_requested,
        "error": job.error,
        "version": version.number if version else None,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def version_out(version: RewardModelVersion, *, curves: bool = False) -> dict[str, Any]:
    out = {
        "number": version.number,
        "kind": version.kind,
        "is_active": version.is_active,
        "job": version.job_id,
        "encoder": {"name": version.encoder.name, "family": version.encoder.family},
        "snapshot": version.snapshot_id,
        "path": version.path,
        "metrics": version.metrics,
        "decision": version.decision,
        "created_at": version.created_at.isoformat(),
    }
    if curves:
        out["curves"] = version.curves
    return out


def _job(project: Any, job_id: int) -> RewardTrainingJob:
    job = (
        RewardTrainingJob.objects.filter(project=project, id=job_id)
        .select_related("project", "encoder", "version")
        .first()
    )
    if job is None:
        raise NotFound(f"no reward job {job_id} in {project.slug}")
    return job


def _version(project: Any, number: int) -> RewardModelVersion:
    version = (
        RewardModelVersion.objects.filter(project=project, number=number)
        .select_related("project", "encoder", "job")
        .first()
    )
    if version is None:
        raise NotFound(f"no reward model v{number} in {project.slug}")
    return version


class RewardJobListCreateView(APIView):
    class InputSerializer(serializers.Serializer):
        kind = serializers.ChoiceField(
            choices=["bt", "aspects", "ensemble", "artifact", "finetune"], required=False
        )
        encoder = serializers.CharField(required=False, allow_blank=True, help_text="local encoder directory")
        snapshot = serializers.IntegerField(
            required=False, help_text="a raw snapshot id (default: a new one)"
        )
        hyperparameters = serializers.DictField(required=False)
        holdout = serializers.FloatField(required=False)
        device = serializers.CharField(required=False, default="cpu")
        promote = serializers.BooleanField(required=False, default=True)

    @extend_schema(operation_id="reward_jobs_list")
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        jobs = (
            RewardTrainingJob.objects.filter(project=project)
            .select_related("encoder", "version")
            .order_by("-created_at")[:100]
        )
        return Response({"jobs": [job_out(j) for j in jobs]})

    @extend_schema(
        operation_id="reward_job_create",
        request=InputSerializer,
        description="Validate and queue a reward-model training job on the gpu queue (managers).",
    )
    def post(self, request: Request, slug: str) -> Response:
        project = selectors.project_get(slug=slug)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        snapshot = None
        if v.get("snapshot") is not None:
            snapshot = DatasetSnapshot.objects.filter(project=project, id=v["snapshot"]).first()
            if snapshot is None:
                raise NotFound(f"no snapshot {v['snapshot']} in {slug}")
        job = services.reward_job_create(
            project=project,
            actor=request.user,
            kind=v.get("kind"),
            encoder_path=v.get("encoder") or None,
            snapshot=snapshot,
            hyperparameters=v.get("hyperparameters") or {},
            holdout=v.get("holdout"),
            device=v["device"],
            promote=v["promote"],
        )
        return Response(job_out(job), status=status.HTTP_202_ACCEPTED)


class RewardJobDetailView(APIView):
    @extend_schema(operation_id="reward_job_detail")
    def get(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(job_out(_job(project, job_id)))


class RewardJobCancelView(APIView):
    @extend_schema(operation_id="reward_job_cancel", request=None)
    def post(self, request: Request, slug: str, job_id: int) -> Response:
        project = selectors.project_get(slug=slug)
        job = services.reward_job_cancel(job=_job(project, job_id), actor=request.user)
        return Response(job_out(job))


class RewardModelListView(APIView):
    @extend_schema(operation_id="reward_models_list")
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        versions = (
            RewardModelVersion.objects.filter(project=project)
            .select_related("encoder")
            .order_by("-number")[:200]
        )
        return Response({"versions": [version_out(v) for v in versions]})


class RewardModelDetailView(APIView):
    @extend_schema(operation_id="reward_model_detail")
    def get(self, request: Request, slug: str, number: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(version_out(_version(project, number), curves=True))


class RewardModelActivateView(APIView):
    @extend_schema(operation_id="reward_model_activate", request=None)
    def post(self, request: Request, slug: str, number: int) -> Response:
        project = selectors.project_get(slug=slug)
        version = services.version_activate(version=_version(project, number), actor=request.user)
        return Response(version_out(version))


class RewardScoresView(APIView):
    @extend_schema(operation_id="reward_scores", description="Scores of samples under a version, best first.")
    def get(self, request: Request, slug: str, number: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        version = _version(project, number)
        rows = SampleScore.objects.filter(version=version).order_by("-reward", "sample_id")[:1000]
        return Response(
            {
                "version": version.number,
                "scores": [
                    {
                        "sample": s.sample_id,
                        "reward": s.reward,
                        "uncertainty": s.uncertainty,
                        "artifact_prob": s.artifact_prob,
                        "aspects": s.aspects,
                    }
                    for s in rows
                ],
            }
        )
