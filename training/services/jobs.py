"""RL jobs: launch (every refusal before anything is stored), run on the ``gpu`` queue with
progress and per-step metrics on the row, cancel, resume after a lost worker, and every kept
checkpoint registered as a generator version of the project's RL generator."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from annotate.errors import Conflict, Invalid, NotFound
from annotate.models import GeneratorVersion, Judgment, ProjectMember, Prompt, Sample
from annotate.selectors import member_role_require
from annotate.services import generator_version_register, snapshot_build, snapshot_create
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


def launch_config_check(*, project: Any, algo: Any, config: Any, field: str) -> Any:
    """The resolved config of ``algo`` for ``project``, or ``Invalid`` naming ``field``: an
    algorithm for another modality, a config that is unknown, mistyped or out of range, a model
    directory that is missing, truncated or of the wrong kind (what an RL launch and the loop's
    settings both check)."""
    if project.modality and project.modality != algo.modality:
        raise Invalid(
            f"{algo.name} trains {algo.modality} generators; this project holds {project.modality}",
            code="wrong_modality",
        )
    try:
        resolved = algo.config_class().from_dict(config)
    except ConfigError as exc:
        raise Invalid(f"{field}: {exc}", code="bad_config") from exc
    problem = _model_problem(getattr(resolved, algo.model_field), algo)
    if problem:
        raise Invalid(f"{field}.{algo.model_field}: {problem}", code="bad_model")
    _init_lora_check(getattr(resolved, "init_lora", ""), field=field)
    return resolved


PEFT_ADAPTER = "adapter_model.safetensors"  # a text policy's LoRA (peft's save_pretrained)


def _init_lora_check(init: str, *, field: str) -> None:
    from training.ml.diffusion.lora import LORA_WEIGHTS  # torch: loaded when checked, not at import

    if init and not any((Path(init) / name).is_file() for name in (LORA_WEIGHTS, PEFT_ADAPTER)):
        raise Invalid(
            f"{field}.init_lora: {init} holds no {LORA_WEIGHTS} or {PEFT_ADAPTER}", code="bad_model"
        )


def _total(config: Any) -> int:
    return int(getattr(config, "iterations", 0) or getattr(config, "steps", 0))


def rl_job_create(
    *,
    project: Any,
    actor: Any,
    algorithm: str,
    config: dict[str, Any],
    feedback: dict[str, Any] | None = None,
    reward: dict[str, Any] | None = None,
    start_version: GeneratorVersion | None = None,
    dispatch: bool = True,
) -> RLJob:
    """Validate and queue an RL job. Refused with ``Invalid`` (nothing stored) for an unknown
    algorithm, one that does not fit the project's modality, a config that is unknown, mistyped or
    out of range, a model directory that is missing, truncated or of the wrong kind for the
    algorithm, a project without prompts or without an active reward model, or ``feedback`` that a
    sampling job would refuse.

    ``feedback`` (``{"prompts": 16, "within_pairs": 1, "render": {...}}``): when the job succeeds,
    its last checkpoint renders the project's newest prompts and they are queued for people to
    judge against the base model on the same prompts and seeds (``training.services.sampling``).

    ``reward`` (``{"version": n, "conservative_k": 1.0, "artifact_version": n,
    "artifact_weight": 1.0}``, every key optional): the reward model (default: the project's active
    one), the conservative ensemble reward ``mean - k * std`` and an artifact classifier's penalty
    (``training.ml.reward``). Versions are named by their number in this project (so they are of
    its modality) and must be of a kind that fits: refused otherwise, with nothing stored.

    ``start_version``: a LoRA version of this project on the same base model, which the job
    continues (``init_lora``) and its feedback compares against (the loop's last good round)."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    algo = ALGORITHMS.get(algorithm)
    if algo is None:
        raise Invalid(f"algorithm must be one of {', '.join(ALGORITHMS)}", code="bad_algorithm")
    resolved = launch_config_check(project=project, algo=algo, config=config, field="config")
    if start_version is not None:
        meta = start_version.metadata or {}
        if not hasattr(resolved, "init_lora"):
            raise Invalid(f"{algorithm} cannot continue a previous adapter", code="bad_config")
        if meta.get("project") != project.slug or not meta.get("adapter"):
            raise Invalid("start_version: not a LoRA version of this project", code="bad_config")
        if str(Path(str(meta.get("base") or ""))) != str(Path(getattr(resolved, algo.model_field))):
            raise Invalid("start_version: an adapter of another base model", code="bad_config")
        _init_lora_check(start_version.checkpoint, field="start_version")
        resolved.init_lora = start_version.checkpoint
    if not Prompt.objects.filter(project=project).exists():
        raise Invalid("the project has no prompts to sample from", code="no_prompts")
    if algo.online:
        version, artifact, options = _reward(project, reward)
    else:
        if reward is not None:
            raise Invalid(
                f"reward: {algorithm} learns from judged pairs, not from a reward model", code="bad_reward"
            )
        decisive = Judgment.objects.filter(
            project=project, outcome__in=DECISIVE, comparison__samples__modality=algo.modality
        )
        if not decisive.exists():
            raise Invalid(
                f"{algorithm} learns from judged pairs: this project has no judgment with a winner "
                f"between {algo.modality} samples yet",
                code="no_pairs",
            )
        version, artifact, options = None, None, {}
    if feedback is not None:
        feedback = feedback_check(project, feedback)
    with transaction.atomic():
        snapshot = None
        if not algo.online:  # the judgments it learns from, frozen now (built by the worker)
            snapshot = snapshot_create(
                project=project, actor=actor, spec=_raw_spec(), name=f"rl-{algorithm}", dispatch=False
            )
        job = RLJob.objects.create(
            project=project,
            algorithm=algorithm,
            config=resolved.to_dict(),
            reward_version=version,
            artifact_version=artifact,
            reward_options=options,
            snapshot=snapshot,
            total_steps=_total(resolved),
            base_version=base_version_for(project=project, path=getattr(resolved, algo.model_field)),
            start_version=start_version,
            feedback=feedback,
            created_by=actor,
        )
        if dispatch:
            transaction.on_commit(lambda: tasks.gpu_rl_job_run.delay(job.id))
    return job


DECISIVE = (Judgment.Outcome.A, Judgment.Outcome.B, Judgment.Outcome.RANKING)


def _raw_spec() -> Any:
    from annotate import exports

    return exports.spec_from_params({"schema": "raw", "format": "jsonl", "aggregate": "none", "media": "url"})


class ImagePairs(Sequence[tuple[str, Any, Any]]):
    """(prompt, winner image, loser image) read from the media files when asked for, so a job over a
    million judged pairs does not hold a million images."""

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> tuple[str, Any, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[str, Any, Any]]: ...
    def __getitem__(self, i: int | slice) -> Any:
        from PIL import Image

        if isinstance(i, slice):
            return ImagePairs(self.rows[i])
        prompt, winner, loser = self.rows[i]
        with Image.open(winner) as w, Image.open(loser) as lo:
            return prompt, w.convert("RGB"), lo.convert("RGB")


def _judged_pairs(job: RLJob, modality: str) -> Sequence[tuple[str, Any, Any]]:
    """(prompt, winner, loser) of every decisive judged pair of ``modality`` samples in the job's
    snapshot (built here the first time; a built snapshot is never rewritten, so a resumed job
    learns from the same pairs): texts, or images read from their files."""
    from rewards.ml.data import A_WINS, B_WINS
    from rewards.services.pairs import snapshot_pairs

    if job.snapshot_id is None:
        raise ValueError("an offline job needs its snapshot")
    snapshot = snapshot_build(snapshot_id=job.snapshot_id)
    snapshot.refresh_from_db()
    if snapshot.status != "done":
        raise ValueError(f"snapshot {snapshot.id} is {snapshot.status}: {snapshot.error}")
    judged = snapshot_pairs(snapshot=snapshot)
    ids = judged.sample_ids
    ordered = [
        (ids[a], ids[b]) if o == A_WINS else (ids[b], ids[a])
        for a, b, o in zip(judged.a.tolist(), judged.b.tolist(), judged.outcome.tolist(), strict=True)
        if o in (A_WINS, B_WINS)
    ]
    wanted = {i for pair in ordered for i in pair}
    samples = {
        s.id: s for s in Sample.objects.filter(id__in=wanted, modality=modality).select_related("prompt")
    }
    # A mixed project's pairs of other modalities (and samples deleted since) are left out.
    ordered = [(w, lo) for w, lo in ordered if w in samples and lo in samples]
    if not ordered:
        raise ValueError(f"the snapshot has no judged pair with a winner between {modality} samples")
    if modality == "text":
        return [(samples[w].prompt.text, samples[w].text, samples[lo].text) for w, lo in ordered]
    return ImagePairs(
        [(samples[w].prompt.text, samples[w].media.path, samples[lo].media.path) for w, lo in ordered]
    )


REWARD_KEYS = ("version", "conservative_k", "artifact_version", "artifact_weight")
MAX_CONSERVATIVE_K = 10.0
MAX_ARTIFACT_WEIGHT = 100.0


def _number(value: Any, *, name: str, low: float, high: float, low_open: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or (value <= low if low_open else value < low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise Invalid(f"reward.{name} must be a number {bound} and <= {high:g}", code="bad_reward")
    return float(value)


def _version(project: Any, value: Any, *, name: str) -> RewardModelVersion:
    """A reward model version of this project by its number (as the rewards API names them), so a
    model of another project, which scores other outputs and maybe another modality, cannot be
    named."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise Invalid(f"reward.{name} must be a reward model version number", code="bad_reward")
    version = RewardModelVersion.objects.filter(project=project, number=value).first()
    if version is None:
        raise Invalid(f"reward.{name}: this project has no reward model version {value}", code="bad_reward")
    return version


def _reward(
    project: Any, reward: Any
) -> tuple[RewardModelVersion, RewardModelVersion | None, dict[str, float]]:
    """The reward model, the artifact classifier (or None) and the resolved options of a launch."""
    reward = {} if reward is None else reward
    if not isinstance(reward, dict) or set(reward) - set(REWARD_KEYS):
        raise Invalid(f"reward: an object with {', '.join(REWARD_KEYS)}", code="bad_reward")
    if reward.get("version") is not None:
        version = _version(project, reward["version"], name="version")
        if version.kind == "artifact":
            raise Invalid(
                "reward.version: an artifact classifier is a penalty, not the reward: pass it as "
                "reward.artifact_version",
                code="bad_reward",
            )
    else:
        active = RewardModelVersion.objects.filter(project=project, is_active=True).first()
        if active is None:
            raise Invalid(
                "the project has no active reward model: train and activate one first", code="no_reward_model"
            )
        version = active
    k = _number(
        reward.get("conservative_k", 0.0),
        name="conservative_k",
        low=0.0,
        high=MAX_CONSERVATIVE_K,
        low_open=False,
    )
    if k > 0 and version.kind != "ensemble":
        raise Invalid(
            f"reward.conservative_k needs an ensemble reward model (mean - k * std); version "
            f"{version.number} is {version.kind}",
            code="bad_reward",
        )
    options = {"conservative_k": k}
    artifact = None
    if reward.get("artifact_version") is not None:
        artifact = _version(project, reward["artifact_version"], name="artifact_version")
        if artifact.kind != "artifact":
            raise Invalid(
                f"reward.artifact_version: version {artifact.number} is {artifact.kind}, not an artifact classifier",
                code="bad_reward",
            )
        options["artifact_weight"] = _number(
            reward.get("artifact_weight", 1.0),
            name="artifact_weight",
            low=0.0,
            high=MAX_ARTIFACT_WEIGHT,
            low_open=True,
        )
    elif "artifact_weight" in reward:
        raise Invalid("reward.artifact_weight needs reward.artifact_version", code="bad_reward")
    return version, artifact, options


def feedback_check(project: Any, feedback: Any) -> dict[str, Any]:
    """``feedback`` as stored: checked as the sampling job it queues would check it."""
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


def _out_of_memory(exc: BaseException) -> str | None:
    """ "GPU" or "CPU" when ``exc`` says the device ran out of memory, None otherwise."""
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfMemoryError" or "CUDA out of memory" in text:
        return "GPU"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text:
        return "CPU"
    return None


def failure_reason(exc: BaseException, algo: Any, config: dict[str, Any]) -> str:
    """What a failed job's row says. Running out of memory names the settings to lower, with their
    values, instead of only the allocator's message."""
    device = _out_of_memory(exc)
    reason = f"{type(exc).__name__}: {exc}"
    if device is None:
        return reason
    settings_now = ", ".join(f"{k}={config[k]}" for k in algo.memory if k in config)
    dtype = " or use dtype bfloat16" if config.get("dtype") == "float32" and device == "GPU" else ""
    return (
        f"out of {device} memory: lower {settings_now}{dtype} (the settings that set {algo.name}'s peak "
        f"memory), or run on a larger device. {reason[:500]}"
    )


def _whole(path: Path) -> bool:
    """Ours (the diffusion trainers') are written beside and renamed into place, so they are whole
    when they exist. transformers' Trainer (under TRL) writes ``checkpoint-<step>`` in place and its
    ``trainer_state.json`` last: one without a readable state was cut short by a dying worker."""
    if (path / "rewardloop_config.json").is_file():  # training.ml.diffusion.lora.RUN_CONFIG (no torch here)
        return True
    try:
        return isinstance(json.loads((path / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def _checkpoint_dirs(out: Path) -> list[Path]:
    """The whole checkpoints in ``out``, oldest first (one being written is a hidden temporary
    directory until its rename, or lacks TRL's final state file, so it is never listed)."""
    done = [
        p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit() and _whole(p)
    ]
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
    from training.ml.reward import PolicyReward

    with transaction.atomic():
        job = (
            RLJob.objects.select_for_update(of=("self",))
            .select_related("project", "reward_version", "artifact_version")
            .get(id=job_id)
        )
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
        reward: Any = None
        if algo.online:
            assert job.reward_version is not None  # set at launch for every online job
            options = job.reward_options or {}
            artifact = job.artifact_version
            reward = PolicyReward(
                RewardFunction.from_pretrained(job.reward_version.path, device=config.device),
                conservative_k=float(options.get("conservative_k", 0.0)),
                artifact=RewardFunction.from_pretrained(artifact.path, device=config.device)
                if artifact
                else None,
                artifact_weight=float(options.get("artifact_weight", 1.0)),
            )
        # Resuming: keep the steps up to the checkpoint; the ones after it are run (and logged) again.
        upto = int(resume.name.split("-")[-1]) if resume else 0
        metrics: list[dict[str, Any]] = [m for m in job.metrics if _step_of(m, 0) <= upto] if resume else []

        def progress(m: Any) -> None:
            row = m.to_dict() if hasattr(m, "to_dict") else dict(m)
            if reward is not None:
                row.update(reward.drain())  # the reward's parts over the outputs scored in this step
            metrics.append(row)
            step = _step_of(row, len(metrics))
            RLJob.objects.filter(id=job.id).update(step=step, metrics=metrics)

        def should_stop() -> bool:
            return bool(RLJob.objects.filter(id=job.id, cancel_requested=True).exists())

        kwargs: dict[str, Any] = {"output_dir": out, "progress": progress, "should_stop": should_stop}
        train = algo.train_fn()
        if "resume_from" in inspect.signature(train).parameters:
            kwargs["resume_from"] = resume
        if algo.online:
            # The diffusion trainers take one reward; TRL's take a list of reward functions.
            result = train(config, prompts, [reward] if algo.modality == "text" else reward, **kwargs)
        else:
            result = train(config, _judged_pairs(job, algo.modality), **kwargs)
    except Exception as exc:  # the job's own failure, recorded with its reason
        if _out_of_memory(exc) == "GPU":  # give the worker's GPU back for the next job
            import torch

            torch.cuda.empty_cache()
        RLJob.objects.filter(id=job.id).update(
            status=RLJob.Status.FAILED,
            error=failure_reason(exc, algo, job.config),
            finished_at=timezone.now(),
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
                incumbent_id=job.start_version_id or job.base_version_id,
                prompts=int(fb["prompts"]),
                within_pairs=int(fb["within_pairs"]),
                render=fb["render"],
                rl_job=job,
            )
    except (Invalid, NotFound) as exc:
        RLJob.objects.filter(id=job.id).update(error=f"feedback not queued: {exc}")
