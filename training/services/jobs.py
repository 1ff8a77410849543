"""RL jobs: launch (every refusal before anything is stored), run on the ``gpu`` queue with
progress and per-step metrics on the row, cancel, resume after a lost worker, and every kept
checkpoint registered as a generator version of the project's RL generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from annotate.errors import Conflict, Invalid, NotFound
from annotate.models import ProjectMember, Prompt
from annotate.selectors import member_role_require
from annotate.services import generator_version_register
from rewards.models import RewardModelVersion
from training import tasks
from training.algorithms import ALGORITHMS
from training.ml.configs import ConfigError
from training.ml.model_dirs import ModelDirError, describe_kinds, inspect_model_dir, require_kind
from training.models import RLJob
from training.services.sampling import base_version_for, sampling_check, sampling_job_create

MAX_PROMPTS = 100_000  # prompts a job samples from (the project's newest)


def _model_problem(path: str, algo: Any) -> str | None:
    try:
        info = inspect_model_dir(path)
    except ModelDirError as exc:
        return f"{algo.name} needs {describe_kinds(algo.model_kinds)}: {exc}"
    try:
        require_kind(info, algo.model_kinds, what=algo.name)
    except ModelDirError as exc:
        return str(exc)
    return None


def _total(config: Any) -> int:
    return int(getattr(config, "iterations", 0) or getattr(config, "steps", 0))


def rl_job_create(
    *,
    project: Any,
    actor: Any,
    algorithm: str,
    config: dict[str, Any],
    feedback: dict[str, Any] | None = None,
    dispatch: bool = True,
) -> RLJob:
    """Validate and queue an RL job. Refused with ``Invalid`` (nothing stored) for an unknown
    algorithm, one that does not fit the project's modality, a config that is unknown, mistyped or
    out of range, a model directory that is missing, truncated or of the wrong kind for the
    algorithm, a project without prompts or without an active reward model, or ``feedback`` that a
    sampling job would refuse.

    ``feedback`` (``{"prompts": 16, "within_pairs": 1, "render": {...}}``): when the job succeeds,
    its last checkpoint renders the project's newest prompts and they are queued for people to
    judge against the base model on the same prompts and seeds (``training.services.sampling``)."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    algo = ALGORITHMS.get(algorithm)
    if algo is None:
        raise Invalid(f"algorithm must be one of {', '.join(ALGORITHMS)}", code="bad_algorithm")
    if project.modality and project.modality != algo.modality:
        raise Invalid(
            f"{algorithm} trains {algo.modality} generators; this project holds {project.modality}",
            code="wrong_modality",
        )
    try:
        resolved = algo.config_class().from_dict(config)
    except ConfigError as exc:
        raise Invalid(f"config: {exc}", code="bad_config") from exc
    problem = _model_problem(getattr(resolved, algo.model_field), algo)
    if problem:
        raise Invalid(f"config.{algo.model_field}: {problem}", code="bad_model")
    if not Prompt.objects.filter(project=project).exists():
        raise Invalid("the project has no prompts to sample from", code="no_prompts")
    version = RewardModelVersion.objects.filter(project=project, is_active=True).first()
    if version is None:
        raise Invalid(
            "the project has no active reward model: train and activate one first", code="no_reward_model"
        )
    if feedback is not None:
        feedback = _feedback(project, feedback)
    with transaction.atomic():
        job = RLJob.objects.create(
            project=project,
            algorithm=algorithm,
            config=resolved.to_dict(),
            reward_version=version,
            total_steps=_total(resolved),
            base_version=base_version_for(project=project, path=getattr(resolved, algo.model_field)),
            feedback=feedback,
            created_by=actor,
        )
        if dispatch:
            transaction.on_commit(lambda: tasks.gpu_rl_job_run.delay(job.id))
    return job


def _feedback(project: Any, feedback: Any) -> dict[str, Any]:
    if not isinstance(feedback, dict) or set(feedback) - {"prompts", "within_pairs", "render"}:
        raise Invalid("feedback: an object with prompts, within_pairs and render", code="bad_config")
    prompts, pairs = feedback.get("prompts", 16), feedback.get("within_pairs", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (prompts, pairs)):
        raise Invalid("feedback: prompts and within_pairs must be integers", code="bad_config")
    render, _ = sampling_check(
        project=project, prompts=prompts, within_pairs=pairs, render=feedback.get("render"), incumbent=True
    )
    return {"prompts": prompts, "within_pairs": pairs, "render": render.to_dict()}


def rl_job_cancel(*, job: RLJob, actor: Any) -> RLJob:
    """Ask a job to stop: a queued one is cancelled at once, a running one at its next step."""
    member_role_require(project=job.project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    with transaction.atomic():
        job = RLJob.objects.select_for_update().get(id=job.id)
        if job.status in (RLJob.Status.SUCCEEDED, RLJob.Status.FAILED, RLJob.Status.CANCELLED):
            raise Conflict(f"job {job.id} already {job.status}")
        job.cancel_requested = True
        if job.status == RLJob.Status.QUEUED:
            job.status, job.finished_at = RLJob.Status.CANCELLED, timezone.now()
        job.save(update_fields=["cancel_requested", "status", "finished_at"])
    return job


def _output_dir(job: RLJob) -> Path:
    return Path(settings.MEDIA_ROOT) / "rl_jobs" / job.project.slug / f"job-{job.id}"


def _checkpoint_dirs(out: Path) -> list[Path]:
    """The whole checkpoints in ``out``, oldest first (one being written is a hidden temporary
    directory until its rename, so it is never listed)."""
    done = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]))


def _last_checkpoint(out: Path) -> Path | None:
    done = _checkpoint_dirs(out)
    return done[-1] if done else None


def _register(job: RLJob, checkpoint: Path) -> Any:
    base = str(job.config.get("pipeline") or job.config.get("policy"))
    info = inspect_model_dir(checkpoint)  # a LoRA adapter, or a whole policy (TRL without LoRA)
    model = inspect_model_dir(base) if info.kind == "lora" else info
    return generator_version_register(
        generator=f"{job.project.slug}-rl",
        version=f"job{job.id}-{checkpoint.name}",
        checkpoint=str(checkpoint),
        metadata={
            "project": job.project.slug,
            "rl_job": job.id,
            "algorithm": job.algorithm,
            "kind": model.kind,
            "class": model.class_name,
            "modality": model.modality,
            "base": base if info.kind == "lora" else "",
            "adapter": info.kind == "lora",
        },
    )


def _step_of(row: dict[str, Any], default: int) -> int:
    value = row.get("iteration") or row.get("step")
    return int(value) if isinstance(value, int | float) else default


def rl_job_run(*, job_id: int) -> RLJob:
    """Run a queued job (or resume a running one whose worker died) to the end. A finished job is
    left as it is. A failure marks the job failed with its reason; a cancel marks it cancelled."""
    from rewards.ml.reward_fn import RewardFunction

    with transaction.atomic():
        job = RLJob.objects.select_for_update().select_related("project", "reward_version").get(id=job_id)
        if job.status not in (RLJob.Status.QUEUED, RLJob.Status.RUNNING):
            return job
        job.status = RLJob.Status.RUNNING
        job.started_at = job.started_at or timezone.now()
        job.output_dir = str(_output_dir(job))
        job.save(update_fields=["status", "started_at", "output_dir"])
    algo = ALGORITHMS[job.algorithm]
    out = Path(job.output_dir)
    resume = _last_checkpoint(out)
    try:
        config = algo.config_class().from_dict(job.config)
        prompts = list(
            Prompt.objects.filter(project=job.project)
            .order_by("-id")
            .values_list("text", flat=True)[:MAX_PROMPTS]
        )
        reward = RewardFunction.from_pretrained(job.reward_version.path, device=config.device)
        # Resuming: keep the steps up to the checkpoint; the ones after it are run (and logged) again.
        upto = int(resume.name.split("-")[-1]) if resume else 0
        metrics: list[dict[str, Any]] = [m for m in job.metrics if _step_of(m, 0) <= upto] if resume else []

        def progress(m: Any) -> None:
            row = m.to_dict() if hasattr(m, "to_dict") else dict(m)
            metrics.append(row)
            step = _step_of(row, len(metrics))
            RLJob.objects.filter(id=job.id).update(step=step, metrics=metrics)

        def should_stop() -> bool:
            return bool(RLJob.objects.filter(id=job.id, cancel_requested=True).exists())

        kwargs: dict[str, Any] = {"output_dir": out, "progress": progress, "should_stop": should_stop}
        diffusion = algo.modality != "text"
        if diffusion:  # TRL runs start again from the base policy (no resume yet)
            kwargs["resume_from"] = resume
        # The diffusion trainers take one reward; TRL's take a list of reward functions.
        rewards = reward if diffusion else [reward]
        result = algo.train_fn()(config, prompts, rewards, **kwargs)
    except Exception as exc:  # the job's own failure, recorded with its reason
        RLJob.objects.filter(id=job.id).update(
            status=RLJob.Status.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        job.refresh_from_db()
        return job
    checkpoints = _checkpoint_dirs(out)
    final = getattr(result, "output_dir", None)
    if final is not None and (Path(final) / "final").is_dir():
        checkpoints.append(Path(final) / "final")
    with transaction.atomic():
        versions = [_register(job, checkpoint) for checkpoint in checkpoints]
        job.refresh_from_db()
        job.checkpoints = [str(p) for p in checkpoints]
        job.status = RLJob.Status.CANCELLED if job.cancel_requested else RLJob.Status.SUCCEEDED
        job.finished_at = timezone.now()
        job.save(update_fields=["checkpoints", "status", "finished_at"])
        if job.status == RLJob.Status.SUCCEEDED and job.feedback and versions and job.base_version_id:
            _feedback_queue(job, versions[-1])
    return job


def _feedback_queue(job: RLJob, version: Any) -> None:
    """The sampling job of a finished RL job: its last version against the base model. A refusal
    (the project's prompts were deleted meanwhile) is recorded on the job, which still succeeded."""
    fb = job.feedback or {}
    try:
        with transaction.atomic():
            sampling_job_create(
                project=job.project,
                actor=None,
                version_id=version.id,
                incumbent_id=job.base_version_id,
                prompts=int(fb["prompts"]),
                within_pairs=int(fb["within_pairs"]),
                render=fb["render"],
                rl_job=job,
            )
    except (Invalid, NotFound) as exc:
        RLJob.objects.filter(id=job.id).update(error=f"feedback not queued: {exc}")
