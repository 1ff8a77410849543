"""RL jobs: launch (every refusal before anything is stored), run on the ``gpu`` queue with
progress and per-step metrics on the row, cancel, resume after a lost worker, and every kept
checkpoint registered as a generator version of the project's RL generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from annotate.errors import Conflict, Invalid
from annotate.models import ProjectMember, Prompt
from annotate.selectors import member_role_require
from annotate.services import generator_version_register
from rewards.models import RewardModelVersion
from training import tasks
from training.algorithms import ALGORITHMS
from training.ml.configs import ConfigError
from training.models import RLJob

MAX_PROMPTS = 100_000  # prompts a job samples from (the project's newest)


def _model_dir_problem(path: Path, modality: str) -> str | None:
    wanted = "model_index.json" if modality == "image" else "config.json"
    try:
        found, has = path.is_dir(), (path / wanted).is_file()
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long: the client's input
        return f"not a usable path ({exc})"
    if not found:
        return f"{path}: no such directory"
    if not has:
        kind = "a diffusers pipeline" if modality == "image" else "a transformers model"
        return f"{path}: not {kind} directory (no {wanted})"
    return None


def _total(config: Any) -> int:
    return int(getattr(config, "iterations", 0) or getattr(config, "steps", 0))


def rl_job_create(
    *, project: Any, actor: Any, algorithm: str, config: dict[str, Any], dispatch: bool = True
) -> RLJob:
    """Validate and queue an RL job. Refused with ``Invalid`` (nothing stored) for an unknown
    algorithm, one that does not fit the project's modality, a config that is unknown, mistyped or
    out of range, a model directory that is missing or of the wrong kind, a project without
    prompts or without an active reward model."""
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
    problem = _model_dir_problem(Path(getattr(resolved, algo.model_field)), algo.modality)
    if problem:
        raise Invalid(f"config.{algo.model_field}: {problem}", code="bad_model")
    if not Prompt.objects.filter(project=project).exists():
        raise Invalid("the project has no prompts to sample from", code="no_prompts")
    version = RewardModelVersion.objects.filter(project=project, is_active=True).first()
    if version is None:
        raise Invalid(
            "the project has no active reward model: train and activate one first", code="no_reward_model"
        )
    with transaction.atomic():
        job = RLJob.objects.create(
            project=project,
            algorithm=algorithm,
            config=resolved.to_dict(),
            reward_version=version,
            total_steps=_total(resolved),
            created_by=actor,
        )
        if dispatch:
            transaction.on_commit(lambda: tasks.gpu_rl_job_run.delay(job.id))
    return job


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


def _last_checkpoint(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _register(job: RLJob, checkpoint: Path) -> None:
    generator_version_register(
        generator=f"{job.project.slug}-rl",
        version=f"job{job.id}-{checkpoint.name}",
        checkpoint=str(checkpoint),
        metadata={
            "rl_job": job.id,
            "algorithm": job.algorithm,
            "base": job.config.get("pipeline") or job.config.get("policy"),
        },
    )


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
        metrics: list[dict[str, Any]] = list(job.metrics) if resume else []

        def progress(m: Any) -> None:
            row = m.to_dict() if hasattr(m, "to_dict") else dict(m)
            metrics.append(row)
            step = int(row.get("iteration") or row.get("step") or len(metrics))
            RLJob.objects.filter(id=job.id).update(step=step, metrics=metrics)

        def should_stop() -> bool:
            return bool(RLJob.objects.filter(id=job.id, cancel_requested=True).exists())

        kwargs: dict[str, Any] = {"output_dir": out, "progress": progress, "should_stop": should_stop}
        if algo.modality == "image":  # TRL runs start again from the base policy (no resume yet)
            kwargs["resume_from"] = resume
        # The diffusion trainers take one reward; TRL's take a list of reward functions.
        rewards = reward if algo.modality == "image" else [reward]
        result = algo.train_fn()(config, prompts, rewards, **kwargs)
    except Exception as exc:  # the job's own failure, recorded with its reason
        RLJob.objects.filter(id=job.id).update(
            status=RLJob.Status.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        job.refresh_from_db()
        return job
    checkpoints = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1])
    )
    final = getattr(result, "output_dir", None)
    if final is not None and (Path(final) / "final").is_dir():
        checkpoints.append(Path(final) / "final")
    for checkpoint in checkpoints:
        _register(job, checkpoint)
    job.refresh_from_db()
    job.checkpoints = [str(p) for p in checkpoints]
    job.status = RLJob.Status.CANCELLED if job.cancel_requested else RLJob.Status.SUCCEEDED
    job.finished_at = timezone.now()
    job.save(update_fields=["checkpoints", "status", "finished_at"])
    return job
