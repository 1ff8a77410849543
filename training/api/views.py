"""REST API of the training app: launch, watch and cancel RL jobs; register generator versions that
are model directories; launch and watch sampling jobs. Thin views: parse, call a
service, render. Permissions are checked by the services (managers launch and cancel; any member
reads). Server paths (the model directory, checkpoints) are shown to staff only."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotate import selectors
from annotate.api.views import AUTHED_ERRORS, BODY_ERRORS, errors
from annotate.errors import NotFound
from training import plots, services
from training.algorithms import ALGORITHMS
from training.models import LoopConfig, LoopRound, RLJob, SamplingJob

PATH_FIELDS = ("pipeline", "policy")


@extend_schema_serializer(component_name="RLJob")
class JobOut(serializers.Serializer):
    id = serializers.IntegerField()
    algorithm = serializers.ChoiceField(choices=list(ALGORITHMS))
    status = serializers.ChoiceField(choices=RLJob.Status.values)
    config = serializers.DictField(help_text="the resolved config (the model directory: staff only)")
    reward_model = serializers.IntegerField(
        allow_null=True,
        help_text="the reward model version number it optimises (none: offline, from judged pairs)",
    )
    snapshot = serializers.IntegerField(
        allow_null=True, help_text="offline algorithms: the dataset snapshot of the judgments it learns from"
    )
    artifact_model = serializers.IntegerField(
        allow_null=True, help_text="the artifact classifier's version number whose P(artifact) is subtracted"
    )
    reward_options = serializers.DictField(
        help_text="{conservative_k, artifact_weight} (training/ml/reward.py)"
    )
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
        "reward_model": job.reward_version.number if job.reward_version else None,
        "snapshot": job.snapshot_id,
        "artifact_model": job.artifact_version.number if job.artifact_version else None,
        "reward_options": job.reward_options,
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
    job = (
        RLJob.objects.filter(project=project, id=job_id)
        .select_related("reward_version", "artifact_version")
        .first()
    )
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
        feedback = serializers.DictField(
            required=False,
            allow_null=True,
            help_text="when set, {prompts, within_pairs, render}: at the end, the last checkpoint's "
            "outputs are queued for judging against the base model (a sampling job)",
        )
        reward = serializers.DictField(
            required=False,
            allow_null=True,
            help_text="how the reward is made, every key optional: {version: reward model number "
            "(default: the active one), conservative_k: mean - k * std of an ensemble, artifact_version: "
            "an artifact classifier's number, artifact_weight: its penalty's weight}",
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
        jobs = (
            RLJob.objects.filter(project=project)
            .select_related("reward_version", "artifact_version")
            .order_by("-id")[:100]
        )
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
            project=project,
            actor=request.user,
            algorithm=v["algorithm"],
            config=v["config"],
            feedback=v.get("feedback"),
            reward=v.get("reward"),
        )
        return Response(job_out(job, staff=request.user.is_staff), status=status.HTTP_202_ACCEPTED)


class RLJobDetailView(APIView):
    @extend_schema(operation_id="rl_job_detail", responses={200: JobOut, **errors(*AUTHED_ERRORS)})
    def get(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(job_out(_job(project, job_id), staff=request.user.is_staff))


class RLJobMetricsPlotView(APIView):
    """The job's per-step metrics as one SVG (a chart per logged number, reward first), for a
    dashboard or a notebook to embed; the numbers themselves are in the job's ``metrics``."""

    @extend_schema(
        operation_id="rl_job_metrics_plot",
        responses={
            (200, "image/svg+xml"): OpenApiResponse(OpenApiTypes.BINARY, description="the charts, one SVG"),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str, job_id: int) -> Any:
        from django.http import HttpResponse

        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        job = _job(project, job_id)
        title = f"RL job {job.id} ({job.algorithm}, {job.status}): step {job.step} of {job.total_steps}"
        return HttpResponse(plots.metrics_svg(job.metrics, title=title), content_type="image/svg+xml")


class RLJobCancelView(APIView):
    @extend_schema(
        operation_id="rl_job_cancel", request=None, responses={200: JobOut, **errors(*AUTHED_ERRORS, 409)}
    )
    def post(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        job = services.rl_job_cancel(job=_job(project, job_id), actor=request.user)
        return Response(job_out(job, staff=request.user.is_staff))


# --- Generator versions that are model directories --------------------------------------------------
@extend_schema_serializer(component_name="GeneratorModel")
class GeneratorModelOut(serializers.Serializer):
    id = serializers.IntegerField()
    generator = serializers.CharField()
    version = serializers.CharField()
    kind = serializers.CharField(help_text="unet, flow, video or causal_lm (an adapter: its base's)")
    model_class = serializers.CharField(help_text="the pipeline's or architecture's class")
    modality = serializers.CharField()
    adapter = serializers.BooleanField(help_text="a LoRA adapter that runs on its base model")
    rl_job = serializers.IntegerField(allow_null=True, help_text="the RL job that wrote it, if any")
    checkpoint = serializers.CharField(required=False, help_text="staff only")
    base = serializers.CharField(required=False, allow_blank=True, help_text="staff only")
    created_at = serializers.DateTimeField()


def generator_out(v: Any, *, staff: bool = False) -> dict[str, Any]:
    m = v.metadata
    out: dict[str, Any] = {
        "id": v.id,
        "generator": v.generator.name,
        "version": v.name,
        "kind": str(m.get("kind", "")),
        "model_class": str(m.get("class", "")),
        "modality": str(m.get("modality", "")),
        "adapter": bool(m.get("adapter", False)),
        "rl_job": m.get("rl_job") if isinstance(m.get("rl_job"), int) else None,
        "created_at": v.created_at.isoformat(),
    }
    if staff:
        out.update(checkpoint=v.checkpoint, base=str(m.get("base", "")))
    return out


class GeneratorModelListCreateView(APIView):
    @extend_schema_serializer(component_name="GeneratorModelRegister")
    class InputSerializer(serializers.Serializer):
        generator = serializers.CharField(max_length=200)
        version = serializers.CharField(max_length=200)
        path = serializers.CharField(max_length=1000, help_text="a local model directory on the server")
        base = serializers.CharField(
            max_length=1000, required=False, allow_blank=True, help_text="for a LoRA adapter: its base model"
        )

    @extend_schema(
        operation_id="generator_models_list",
        responses={
            200: inline_serializer("GeneratorModelList", {"versions": GeneratorModelOut(many=True)}),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        versions = services.generator_models_of(project=project)
        return Response({"versions": [generator_out(v, staff=request.user.is_staff) for v in versions]})

    @extend_schema(
        operation_id="generator_model_register",
        request=InputSerializer,
        description="Register (or update) a generator version that is a local model directory "
        "(managers): a diffusers pipeline, a causal LM, or a LoRA adapter with its base; checked "
        "from its files (missing, truncated or of the wrong kind: a 400, nothing stored).",
        responses={201: GeneratorModelOut, **errors(*AUTHED_ERRORS, *BODY_ERRORS)},
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        version = services.generator_model_register(
            project=project,
            actor=request.user,
            generator=v["generator"],
            version=v["version"],
            path=v["path"],
            base=v.get("base", ""),
        )
        return Response(generator_out(version, staff=request.user.is_staff), status=status.HTTP_201_CREATED)


# --- Sampling jobs ------------------------------------------------------------------------------------
@extend_schema_serializer(component_name="SamplingJob")
class SamplingJobOut(serializers.Serializer):
    id = serializers.IntegerField()
    round = serializers.IntegerField()
    status = serializers.ChoiceField(choices=SamplingJob.Status.values)
    version = serializers.IntegerField(help_text="the generator version rendered")
    incumbent = serializers.IntegerField(allow_null=True)
    rl_job = serializers.IntegerField(allow_null=True)
    prompts = serializers.IntegerField()
    within_pairs = serializers.IntegerField()
    render = serializers.DictField(help_text="the render settings (training/ml/render.py)")
    done = serializers.IntegerField()
    total = serializers.IntegerField()
    samples_created = serializers.IntegerField()
    samples_reused = serializers.IntegerField()
    comparisons_created = serializers.IntegerField()
    identical = serializers.IntegerField()
    error = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    rendered_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


def _iso(t: Any) -> str | None:
    return t.isoformat() if t else None


def sampling_out(job: SamplingJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "round": job.round,
        "status": job.status,
        "version": job.version_id,
        "incumbent": job.incumbent_id,
        "rl_job": job.rl_job_id,
        "prompts": len(job.prompt_ids),
        "within_pairs": job.within_pairs,
        "render": job.config,
        "done": job.done,
        "total": job.total,
        "samples_created": job.samples_created,
        "samples_reused": job.samples_reused,
        "comparisons_created": job.comparisons_created,
        "identical": job.identical,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "started_at": _iso(job.started_at),
        "rendered_at": _iso(job.rendered_at),
        "finished_at": _iso(job.finished_at),
    }


class SamplingJobListCreateView(APIView):
    @extend_schema_serializer(component_name="SamplingJobCreate")
    class InputSerializer(serializers.Serializer):
        version = serializers.IntegerField(help_text="the generator version to render")
        incumbent = serializers.IntegerField(
            required=False, allow_null=True, help_text="compared on the same prompts and seeds"
        )
        prompts = serializers.IntegerField(default=16, help_text="the project's newest N prompts")
        within_pairs = serializers.IntegerField(default=1, help_text="pairs per prompt within the new group")
        render = serializers.DictField(required=False, help_text="training/ml/render.py:RenderConfig fields")
        round = serializers.IntegerField(required=False, allow_null=True, help_text="default: the next round")

    @extend_schema(
        operation_id="sampling_jobs_list",
        responses={
            200: inline_serializer("SamplingJobList", {"jobs": SamplingJobOut(many=True)}),
            **errors(*AUTHED_ERRORS),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        jobs = SamplingJob.objects.filter(project=project).order_by("-id")[:100]
        return Response({"jobs": [sampling_out(j) for j in jobs]})

    @extend_schema(
        operation_id="sampling_job_create",
        request=InputSerializer,
        description="Render a generator version's outputs for the project's newest prompts (gpu "
        "queue), then queue comparisons against the incumbent and within the group, tagged with the "
        "round (managers); every refusal is a 4xx with nothing stored.",
        responses={202: SamplingJobOut, **errors(*AUTHED_ERRORS, *BODY_ERRORS)},
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        job = services.sampling_job_create(
            project=project,
            actor=request.user,
            version_id=v["version"],
            incumbent_id=v.get("incumbent"),
            prompts=v["prompts"],
            within_pairs=v["within_pairs"],
            render=v.get("render") or {},
            round=v.get("round"),
        )
        return Response(sampling_out(job), status=status.HTTP_202_ACCEPTED)


class SamplingJobDetailView(APIView):
    @extend_schema(
        operation_id="sampling_job_detail", responses={200: SamplingJobOut, **errors(*AUTHED_ERRORS)}
    )
    def get(self, request: Request, slug: str, job_id: int) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        job = SamplingJob.objects.filter(project=project, id=job_id).first()
        if job is None:
            raise NotFound(f"no sampling job {job_id} in {project.slug}")
        return Response(sampling_out(job))


# --- The loop ------------------------------------------------------------------------------------
@extend_schema_serializer(component_name="LoopRound")
class LoopRoundOut(serializers.Serializer):
    number = serializers.IntegerField()
    state = serializers.ChoiceField(choices=LoopRound.State.values)
    reason = serializers.CharField(allow_blank=True, help_text="where it stands, or why it stopped")
    reward_job = serializers.IntegerField(allow_null=True)
    rl_job = serializers.IntegerField(allow_null=True)
    sampling_job = serializers.IntegerField(allow_null=True)
    new_version = serializers.IntegerField(allow_null=True, help_text="the generator version the round made")
    incumbent = serializers.IntegerField(allow_null=True, help_text="the version it was compared with")
    verdicts = serializers.IntegerField()
    predicted_win_rate = serializers.FloatField(allow_null=True, help_text="the reward model's P(new wins)")
    human_win_rate = serializers.FloatField(allow_null=True, help_text="ties count half")
    human_ci_low = serializers.FloatField(allow_null=True)
    human_ci_high = serializers.FloatField(allow_null=True)
    kl = serializers.FloatField(allow_null=True)
    history = serializers.ListField(child=serializers.DictField(), help_text="[{state, at}, ...]")
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


@extend_schema_serializer(component_name="Loop")
class LoopOut(serializers.Serializer):
    enabled = serializers.BooleanField()
    paused = serializers.BooleanField()
    algorithm = serializers.CharField()
    rl_config = serializers.DictField(help_text="the model directory: staff only")
    feedback = serializers.DictField()
    reward_kind = serializers.CharField()
    retrain_after = serializers.IntegerField()
    verdicts_needed = serializers.IntegerField()
    guard_margin = serializers.FloatField()
    max_rounds = serializers.IntegerField()
    stopped_reason = serializers.CharField(allow_blank=True)
    rounds = LoopRoundOut(many=True)


def loop_out(config: LoopConfig, *, staff: bool) -> dict[str, Any]:
    rl_config = dict(config.rl_config)
    if not staff:
        for name in PATH_FIELDS:
            rl_config.pop(name, None)
    rounds = LoopRound.objects.filter(project_id=config.project_id).order_by("number")
    return {
        "enabled": config.enabled,
        "paused": config.paused,
        "algorithm": config.algorithm,
        "rl_config": rl_config,
        "feedback": config.feedback,
        "reward_kind": config.reward_kind,
        "retrain_after": config.retrain_after,
        "verdicts_needed": config.verdicts_needed,
        "guard_margin": config.guard_margin,
        "max_rounds": config.max_rounds,
        "stopped_reason": config.stopped_reason,
        "rounds": [
            {
                "number": r.number,
                "state": r.state,
                "reason": r.reason,
                "reward_job": r.reward_job_id,
                "rl_job": r.rl_job_id,
                "sampling_job": r.sampling_job_id,
                "new_version": r.new_version_id,
                "incumbent": r.incumbent_id,
                "verdicts": r.verdicts,
                "predicted_win_rate": r.predicted_win_rate,
                "human_win_rate": r.human_win_rate,
                "human_ci_low": r.human_ci_low,
                "human_ci_high": r.human_ci_high,
                "kl": r.kl,
                "history": r.history,
                "started_at": r.started_at.isoformat(),
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            }
            for r in rounds
        ],
    }


def _loop(project: Any) -> LoopConfig:
    config = LoopConfig.objects.filter(project=project).first()
    if config is None:
        raise NotFound(f"project {project.slug} has no loop yet")
    return config


class LoopView(APIView):
    @extend_schema_serializer(component_name="LoopSet")
    class InputSerializer(serializers.Serializer):
        enabled = serializers.BooleanField(default=True)
        algorithm = serializers.ChoiceField(
            choices=list(ALGORITHMS), help_text="an online algorithm (the offline ones are refused)"
        )
        rl_config = serializers.DictField(
            help_text="the algorithm's config (its model directory on the server)"
        )
        feedback = serializers.DictField(required=False, help_text="{prompts, within_pairs, render}")
        reward_kind = serializers.CharField(required=False, default="bt", max_length=20)
        reward_hyperparameters = serializers.DictField(required=False, default=dict)
        encoder_path = serializers.CharField(required=False, default="", allow_blank=True, max_length=1000)
        retrain_after = serializers.IntegerField(required=False, default=50, min_value=1, max_value=1_000_000)
        verdicts_needed = serializers.IntegerField(required=False, default=20, min_value=1, max_value=100_000)
        guard_margin = serializers.FloatField(required=False, default=0.15, min_value=0.0, max_value=1.0)
        max_rounds = serializers.IntegerField(required=False, default=10, min_value=1, max_value=1000)

    @extend_schema(operation_id="loop_detail", responses={200: LoopOut, **errors(*AUTHED_ERRORS)})
    def get(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        return Response(loop_out(_loop(project), staff=request.user.is_staff))

    @extend_schema(
        operation_id="loop_set",
        request=InputSerializer,
        description="Set and switch on (or off) the project's loop (managers); every setting is checked "
        "as an RL launch checks it, and a refusal stores nothing.",
        responses={200: LoopOut, **errors(*AUTHED_ERRORS, *BODY_ERRORS)},
    )
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        config = services.loop_config_set(project=project, actor=request.user, **data.validated_data)
        return Response(loop_out(config, staff=request.user.is_staff))


class LoopPauseView(APIView):
    paused = True

    @extend_schema(request=None, responses={200: LoopOut, **errors(*AUTHED_ERRORS)})
    def post(self, request: Request, slug: str) -> Response:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
        config = services.loop_pause(project=project, actor=request.user, paused=self.paused)
        return Response(loop_out(config, staff=request.user.is_staff))


class LoopResumeView(LoopPauseView):
    paused = False
