"""REST API of the rewards app: launch, watch and cancel training jobs; list versions, activate one,
read scores. Thin views: parse, call a service, render. Permissions are checked by the services
(managers launch, cancel and activate; any member reads)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotate import selectors
from annotate.api.views import AUTHED_ERRORS, BODY_ERRORS, INT64_MAX, FiniteFloatField, errors
from annotate.errors import NotFound
from annotate.models import DatasetSnapshot
from rewards import services
from rewards.models import KIND_CHOICES, RewardModelVersion, RewardTrainingJob, SampleScore

KINDS = [k for k, _ in KIND_CHOICES]


# --- OpenAPI: the shapes ``job_out`` and ``version_out`` build (documentation only) ---------------
@extend_schema_serializer(component_name="RewardJobEncoder")
class JobEncoderOut(serializers.Serializer):
    name = serializers.CharField()
    family = serializers.CharField(help_text="clip | siglip | text")
    path = serializers.CharField(required=False, help_text="the encoder directory on the server (staff only)")


@extend_schema_serializer(component_name="RewardJob")
class JobOut(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=KINDS)
    status = serializers.ChoiceField(choices=RewardTrainingJob.Status.values)
    trigger = serializers.ChoiceField(choices=RewardTrainingJob.Trigger.values)
    encoder = JobEncoderOut()
    snapshot = serializers.IntegerField(help_text="the dataset snapshot it trains on")
    config = serializers.DictField(help_text="the resolved hyperparameters of the kind")
    holdout = serializers.FloatField()
    device = serializers.CharField()
    progress = serializers.DictField(help_text="phase, step, total_steps, epoch, loss, eta_s")
    cancel_requested = serializers.BooleanField()
    error = serializers.CharField(allow_blank=True)
    version = serializers.IntegerField(allow_null=True, help_text="the version number it produced")
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


@extend_schema_serializer(component_name="RewardModelEncoder")
class VersionEncoderOut(serializers.Serializer):
    name = serializers.CharField()
    family = serializers.CharField(help_text="clip | siglip | text")


@extend_schema_serializer(component_name="RewardModel")
class VersionOut(serializers.Serializer):
    number = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=KINDS)
    is_active = serializers.BooleanField()
    job = serializers.IntegerField()
    encoder = VersionEncoderOut()
    snapshot = serializers.IntegerField()
    path = serializers.CharField(
        required=False, help_text="save_pretrained directory on the server (staff only)"
    )
    metrics = serializers.DictField()
    decision = serializers.DictField(help_text="champion/challenger outcome")
    created_at = serializers.DateTimeField()


@extend_schema_serializer(component_name="RewardModelWithCurves")
class VersionWithCurvesOut(VersionOut):
    curves = serializers.ListField(child=serializers.JSONField(), help_text="training curves")


def version_of(job: RewardTrainingJob) -> RewardModelVersion | None:
    """The job's version (load jobs with ``select_related("version")`` to avoid a query each)."""
    try:
        return job.version
    except RewardModelVersion.DoesNotExist:
        return None


def job_out(job: RewardTrainingJob, *, staff: bool = False) -> dict[str, Any]:
    """A job as the API shows it; server filesystem paths (the encoder's) only to staff."""
    version = version_of(job)
    encoder = {"name": job.encoder.name, "family": job.encoder.family}
    if staff:
        encoder["path"] = job.encoder_path
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "trigger": job.trigger,
        "encoder": encoder,
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


def version_out(version: RewardModelVersion, *, curves: bool = False, staff: bool = False) -> dict[str, Any]:
    """A version as the API shows it; its directory on the server only to staff."""
    out = {
        "number": version.number,
        "kind": version.kind,
        "is_active": version.is_active,
        "job": version.job_id,
        "encoder": {"name": version.encoder.name, "family": version.encoder.family},
        "snapshot": version.snapshot_id,
        "metrics": version.metrics,
        "decision": version.decision,
        "created_at": version.created_at.isoformat(),
    }
    if staff:
        out["path"] = version.path
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
    @extend_schema_serializer(component_name="RewardJobCreate")
    class InputSerializer(serializers.Serializer):
        kind = serializers.ChoiceField(choices=KINDS, required=False)
        encoder = serializers.CharField(
            required=False, allow_blank=True, max_length=1000, help_text="local encoder directory"
        )
        snapshot = serializers.IntegerField(
            required=False,
            min_value=1,
            max_value=INT64_MAX,
            help_text="a raw snapshot id (default: a new one)",
        )
        hyperparameters = serializers.DictField(required=False)
        holdout = FiniteFloatField(required=False, help_text="0.05-0.5 (checked by the service)")
        device = serializers.CharField(
            required=False, default="cpu", max_length=20, help_text="cpu, cuda[:N]"
        )
        promote = serializers.BooleanField(required=False, default=True)

    @extend_schema(
        operation_id="reward_jobs_list",
        responses={
            200: inline_serializer("RewardJobList", {"jobs": JobOut(many=True)}),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        jobs = (
            RewardTrainingJob.objects.filter(project=project)
            .select_related("encoder", "version")
            .order_by("-created_at")[:100]
        )
        return Response({"jobs": [job_out(j, staff=request.user.is_staff) for j in jobs]})

    @extend_schema(
        operation_id="reward_job_create",
        request=InputSerializer,
        description="Validate and queue a reward-model training job on the gpu queue (managers).",
        responses={202: JobOut, **errors(*AUTHED_ERRORS, *BODY_ERRORS)},
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
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
        return Response(job_out(job, staff=request.user.is_staff), status=status.HTTP_202_ACCEPTED)


class RewardJobDetailView(APIView):
    @extend_schema(operation_id="reward_job_detail", responses={200: JobOut, **errors(*AUTHED_ERRORS)})
    def get(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(job_out(_job(project, job_id), staff=request.user.is_staff))


class RewardJobCancelView(APIView):
    @extend_schema(
        operation_id="reward_job_cancel", request=None, responses={200: JobOut, **errors(*AUTHED_ERRORS, 409)}
    )
    def post(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        job = services.reward_job_cancel(job=_job(project, job_id), actor=request.user)
        return Response(job_out(job, staff=request.user.is_staff))


class RewardModelListView(APIView):
    @extend_schema(
        operation_id="reward_models_list",
        responses={
            200: inline_serializer("RewardModelList", {"versions": VersionOut(many=True)}),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        versions = (
            RewardModelVersion.objects.filter(project=project)
            .select_related("encoder")
            .order_by("-number")[:200]
        )
        return Response({"versions": [version_out(v, staff=request.user.is_staff) for v in versions]})


class RewardModelDetailView(APIView):
    @extend_schema(
        operation_id="reward_model_detail", responses={200: VersionWithCurvesOut, **errors(*AUTHED_ERRORS)}
    )
    def get(self, request: Request, slug: str, number: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(version_out(_version(project, number), curves=True, staff=request.user.is_staff))


class RewardModelActivateView(APIView):
    @extend_schema(
        operation_id="reward_model_activate",
        request=None,
        responses={200: VersionOut, **errors(*AUTHED_ERRORS)},
    )
    def post(self, request: Request, slug: str, number: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        version = services.version_activate(version=_version(project, number), actor=request.user)
        return Response(version_out(version, staff=request.user.is_staff))


class RewardScoresView(APIView):
    @extend_schema(
        operation_id="reward_scores",
        description="Scores of samples under a version, best first (the top 1,000).",
        responses={
            200: inline_serializer(
                "RewardScores",
                {
                    "version": serializers.IntegerField(),
                    "scores": inline_serializer(
                        "RewardScore",
                        {
                            "sample": serializers.IntegerField(),
                            "reward": serializers.FloatField(),
                            "uncertainty": serializers.FloatField(allow_null=True),
                            "artifact_prob": serializers.FloatField(allow_null=True),
                            "aspects": serializers.DictField(child=serializers.FloatField()),
                        },
                        many=True,
                    ),
                },
            ),
            **errors(*AUTHED_ERRORS),
        },
    )
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
