"""REST API of the training app: launch, watch and cancel RL jobs. Thin views: parse, call a
service, render. Permissions are checked by the services (managers launch and cancel; any member
reads). Server paths (the model directory, checkpoints) are shown to staff only."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotate import selectors
from annotate.api.views import AUTHED_ERRORS, BODY_ERRORS, errors
from annotate.errors import NotFound
from training import services
from training.algorithms import ALGORITHMS
from training.models import RLJob

PATH_FIELDS = ("pipeline", "policy")


@extend_schema_serializer(component_name="RLJob")
class JobOut(serializers.Serializer):
    id = serializers.IntegerField()
    algorithm = serializers.ChoiceField(choices=list(ALGORITHMS))
    status = serializers.ChoiceField(choices=RLJob.Status.values)
    config = serializers.DictField(help_text="the resolved config (the model directory: staff only)")
    reward_model = serializers.IntegerField(help_text="the reward model version number it optimises")
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField()
    metrics = serializers.ListField(child=serializers.DictField(), help_text="one object per step")
    checkpoints = serializers.ListField(child=serializers.CharField(), required=False, help_text="staff only")
    cancel_requested = serializers.BooleanField()
    error = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


def job_out(job: RLJob, *, staff: bool = False) -> dict[str, Any]:
    config = dict(job.config)
    if not staff:
        for name in PATH_FIELDS:
            config.pop(name, None)
    out: dict[str, Any] = {
        "id": job.id,
        "algorithm": job.algorithm,
        "status": job.status,
        "config": config,
        "reward_model": job.reward_version.number,
        "step": job.step,
        "total_steps": job.total_steps,
        "metrics": job.metrics,
        "cancel_requested": job.cancel_requested,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
    if staff:
        out["checkpoints"] = job.checkpoints
    return out


def _job(project: Any, job_id: int) -> RLJob:
    job = RLJob.objects.filter(project=project, id=job_id).select_related("reward_version").first()
    if job is None:
        raise NotFound(f"no RL job {job_id} in {project.slug}")
    return job


class RLJobListCreateView(APIView):
    @extend_schema_serializer(component_name="RLJobCreate")
    class InputSerializer(serializers.Serializer):
        algorithm = serializers.ChoiceField(choices=list(ALGORITHMS))
        config = serializers.DictField(
            help_text="the algorithm's config fields (training/ml/<algorithm>/config.py); the model "
            "directory (pipeline or policy) is a path on the server"
        )

    @extend_schema(
        operation_id="rl_jobs_list",
        responses={
            200: inline_serializer("RLJobList", {"jobs": JobOut(many=True)}),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        jobs = RLJob.objects.filter(project=project).select_related("reward_version").order_by("-id")[:100]
        return Response({"jobs": [job_out(j, staff=request.user.is_staff) for j in jobs]})

    @extend_schema(
        operation_id="rl_job_create",
        request=InputSerializer,
        description="Validate and queue an RL job on the gpu queue (managers); every refusal is a 400 "
        "with nothing stored.",
        responses={202: JobOut, **errors(*AUTHED_ERRORS, *BODY_ERRORS)},
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        job = services.rl_job_create(
            project=project, actor=request.user, algorithm=v["algorithm"], config=v["config"]
        )
        return Response(job_out(job, staff=request.user.is_staff), status=status.HTTP_202_ACCEPTED)


class RLJobDetailView(APIView):
    @extend_schema(operation_id="rl_job_detail", responses={200: JobOut, **errors(*AUTHED_ERRORS)})
    def get(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(job_out(_job(project, job_id), staff=request.user.is_staff))


class RLJobCancelView(APIView):
    @extend_schema(
        operation_id="rl_job_cancel", request=None, responses={200: JobOut, **errors(*AUTHED_ERRORS, 409)}
    )
    def post(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        job = services.rl_job_cancel(job=_job(project, job_id), actor=request.user)
        return Response(job_out(job, staff=request.user.is_staff))
