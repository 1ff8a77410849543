"""Reward-model training jobs: validate and launch (``reward_job_create``), cancel, and run in a worker (``reward_job_run``: snapshot -> pairs -> embeddings -> trainer -> metrics -> version -> decision)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from annotate.errors import Conflict, Forbidden, Invalid, NotFound
from annotate.models import DatasetSnapshot, Judgment, Project, ProjectMember, Sample
from annotate.services import member_role_require, snapshot_build, snapshot_create, task_dispatch
from rewards import tasks
from rewards.models import (
    Encoder,
    RewardModelVersion,
    RewardTrainingJob,
)
from rewards.services.config import reward_config_read
from rewards.services.embeddings import config_embedding_input, embeddings_ensure, features_load
from rewards.services.encoders import (
    encoder_default_path,
    encoder_inspect,
    encoder_known,
    encoder_record,
    encoder_register,
    encoder_supports,
    project_modalities,
    sample_image_open,
)
from rewards.services.pairs import JudgedPairs, Split, pairs_split, snapshot_pairs, split_check, split_indices
from rewards.services.registry import version_decide

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


def reward_hyperparameters_resolve(kind: str, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """The kind's full config with ``overrides`` applied and validated (a 400 naming the field)."""
    from rewards.ml.finetune.config import FinetuneConfig
    from rewards.ml.kinds import CONFIGS as HEAD_CONFIGS
    from rewards.ml.progress import ConfigError

    configs: dict[str, Any] = {**HEAD_CONFIGS, "finetune": FinetuneConfig}
    if kind not in configs:
        raise Invalid(f"unknown reward model kind {kind!r}; choose one of {', '.join(sorted(configs))}")
    if not isinstance(overrides, dict):
        raise Invalid("hyperparameters must be a JSON object")
    values = dict(overrides)
    values.setdefault("device", device)
    try:
        config = configs[kind].from_dict(values)
        config.validate()
    except ConfigError as exc:
        raise Invalid(
            f"hyperparameter {exc.field}: {exc.message}",
            code="bad_hyperparameter",
            details={"field": exc.field},
        ) from exc
    return config.to_dict()


def _raw_spec() -> Any:
    from annotate import exports

    return exports.spec_from_params(
        {"schema": "raw", "format": "parquet", "aggregate": "none", "media": "url"}
    )


def _pairs_expected(project: Project, snapshot: DatasetSnapshot | None) -> tuple[np.ndarray, set[int]]:
    """The comparison id of every pair the job will read, and the gold comparisons that never
    train, as ``snapshot_pairs`` will find them: from the built snapshot itself, or else from the
    judgments that a snapshot with that spec (or the raw one a launch records) will hold."""
    if snapshot is not None and snapshot.status == DatasetSnapshot.Status.DONE and snapshot.file:
        pairs = snapshot_pairs(snapshot=snapshot)
        return pairs.comparison, pairs.gold_comparisons
    from annotate import exports

    spec = exports.spec_from_dict(snapshot.spec) if snapshot is not None else _raw_spec()
    where, params = exports.judgment_where(project, spec)
    # The rules of snapshot_pairs in SQL: a pairwise outcome of a two-sample comparison is one pair,
    # a ranking of n samples n(n-1)/2; a gold comparison with a usable answer never trains.
    with connection.cursor() as cur:
        cur.execute(
            f"""
            SELECT c.id,
                   c.is_gold AND n.n = 2 AND c.gold_answer->>'outcome' IN ('a', 'b', 'tie', 'both_bad'),
                   sum(CASE WHEN j.outcome = 'ranking' AND jsonb_typeof(j.ranking) = 'array'
                            THEN jsonb_array_length(j.ranking) * (jsonb_array_length(j.ranking) - 1) / 2
                            WHEN j.outcome IN ('a', 'b', 'tie', 'both_bad') AND n.n = 2 THEN 1
                            ELSE 0 END)
            FROM annotate_judgment j
            JOIN annotate_comparison c ON c.id = j.comparison_id
            CROSS JOIN LATERAL (
                SELECT count(*) AS n FROM annotate_comparisonsample cs WHERE cs.comparison_id = c.id
            ) n
            WHERE {" AND ".join(where)}
            GROUP BY c.id, n.n
            """,
            params,
        )
        rows = cur.fetchall()
    comparison = np.repeat(
        np.array([r[0] for r in rows], dtype=np.int64), np.array([int(r[2]) for r in rows], dtype=np.int64)
    )
    return comparison, {int(r[0]) for r in rows if r[1]}


def reward_job_create(
    *,
    project: Project,
    actor: Any,
    kind: str | None = None,
    encoder_path: str | None = None,
    snapshot: DatasetSnapshot | None = None,
    hyperparameters: dict[str, Any] | None = None,
    holdout: float | None = None,
    device: str = "cpu",
    promote: bool = True,
    trigger: str = RewardTrainingJob.Trigger.MANUAL,
    dispatch: bool = True,
) -> RewardTrainingJob:
    """Validate and queue a reward-model training job (managers only).

    Everything that can be checked before training is checked here, with a clear message: the
    kind and its hyperparameters, the encoder directory (a real transformers model of a supported
    family, able to embed the project's modality), the held-out share, and that the project (or
    the given snapshot) holds enough judged pairs. Without ``snapshot`` a raw Parquet snapshot of
    every judgment is recorded now and built by the job, so each version names the exact data it
    saw. ``dispatch`` queues the job on the ``gpu`` queue once the transaction commits."""
    # Every check reads only: a refused launch leaves no row behind (not even a RewardConfig or
    # an Encoder), and it refuses exactly what the worker would, with the same split.
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    rc = reward_config_read(project)
    kind = kind or rc.kind
    holdout = rc.holdout if holdout is None else float(holdout)
    if not 0.05 <= holdout <= 0.5:
        raise Invalid("holdout must be between 0.05 and 0.5 (the share of comparisons held out)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise Invalid(f"device must be 'cpu' or 'cuda[:N]', not {device!r}")
    config = reward_hyperparameters_resolve(
        kind, dict(rc.hyperparameters or {}) | dict(hyperparameters or {}), device
    )
    # Cheap refusals first: the encoder check may build the built-in encoder (torch) on first use.
    if not Judgment.objects.filter(project=project).exists():
        raise Invalid(
            f"project {project.slug!r} has no judgments yet: nothing to train on", code="no_judgments"
        )
    if encoder_path and not getattr(actor, "is_staff", False) and not encoder_known(encoder_path):
        # A server path is the staff's to choose: a manager who could name any directory would
        # learn which ones exist from the errors. Managers pick among registered encoders.
        raise Forbidden(
            "only staff can register a new encoder directory; use one already registered or ask an admin",
            code="bad_encoder",
        )
    info = encoder_inspect(encoder_path or rc.encoder_path or encoder_default_path(project))
    modalities = project_modalities(project)
    fits = (modalities == ["image"] and info.family != "text") or (
        modalities == ["text"] and info.family == "text"
    )
    if kind == "finetune" and not fits:
        raise Invalid(
            "encoder fine-tuning is for image projects with a CLIP or SigLIP encoder, or text projects "
            "with a sentence encoder",
            code="bad_encoder",
        )
    unsupported = [m for m in modalities if not encoder_supports(info, m)]
    if unsupported:
        # One head needs one embedding space: the encoder must embed every kind of sample there is.
        raise Invalid(
            f"encoder {info.name} is a {info.family} encoder and cannot embed "
            f"{' or '.join(unsupported)} samples",
            code="bad_encoder",
        )
    if snapshot is not None:
        if snapshot.project_id != project.id:
            raise NotFound(f"no snapshot {snapshot.id} in {project.slug}")
        if snapshot.spec.get("schema") != "raw" or snapshot.spec.get("aggregate", "none") != "none":
            raise Invalid("a reward job trains on a raw snapshot (schema=raw, aggregate=none)")
        if snapshot.status == DatasetSnapshot.Status.FAILED:
            raise Invalid(f"snapshot {snapshot.id} failed to build: {snapshot.error}")
    comparison, gold = _pairs_expected(project, snapshot)
    train_idx, held_idx = split_indices(project.id, comparison, gold, holdout)
    split_check(kind=kind, total=len(comparison), train=len(train_idx), held=len(held_idx), holdout=holdout)
    with transaction.atomic():
        encoder = encoder_record(info)
        own_snapshot = snapshot is None
        if snapshot is None:
            snapshot = snapshot_create(
                project=project, actor=actor, spec=_raw_spec(), name=f"reward-{kind}", dispatch=False
            )
        job = RewardTrainingJob.objects.create(
            project=project,
            kind=kind,
            encoder=encoder,
            encoder_path=encoder.path,
            snapshot=snapshot,
            config=config,
            holdout=holdout,
            video_frames=rc.video_frames,
            device=device,
            promote=promote,
            trigger=trigger,
            created_by=actor,
            progress={"phase": "queued"},
        )
        if dispatch:

            def undo() -> None:  # the broker is down: no job may wait for ever in "queued"
                RewardTrainingJob.objects.filter(id=job.id).delete()
                if own_snapshot:
                    DatasetSnapshot.objects.filter(id=snapshot.id).delete()

            task_dispatch(tasks.gpu_train_reward_model, job.id, undo=undo)
    return job


def reward_job_cancel(*, job: RewardTrainingJob, actor: Any) -> RewardTrainingJob:
    """Ask a job to stop. A queued job is cancelled at once; a running one stops at its next
    progress report (within about a second of training)."""
    member_role_require(project=job.project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    with transaction.atomic():
        job = RewardTrainingJob.objects.select_for_update().get(id=job.id)
        if job.status in (
            RewardTrainingJob.Status.SUCCEEDED,
            RewardTrainingJob.Status.FAILED,
            RewardTrainingJob.Status.CANCELLED,
        ):
            raise Conflict(f"job {job.id} already {job.status}")
        job.cancel_requested = True
        fields = ["cancel_requested"]
        if job.status == RewardTrainingJob.Status.QUEUED:
            job.status = RewardTrainingJob.Status.CANCELLED
            job.finished_at = timezone.now()
            fields += ["status", "finished_at"]
        job.save(update_fields=fields)
    cache.set(cancel_key(job), True, timeout=7 * 24 * 3600)
    return job


def cancel_key(job: RewardTrainingJob) -> str:
    # The creation time makes the key unique across databases that reuse ids: test processes running
    # side by side (pytest -n) share one Redis, and a job id alone let one process's cancel stop
    # another's same-numbered job mid-training.
    return f"rewardjob:{job.id}:{job.created_at.timestamp()}:cancel"


class _Reporter:
    """Writes a job's progress at most once a second and checks for cancellation at the same time."""

    def __init__(self, job: RewardTrainingJob, echo: ProgressFn | None):
        self.job_id = job.id
        self.cancel_key = cancel_key(job)
        self.echo = echo
        self.last = 0.0
        self.state: dict[str, Any] = {}

    def __call__(self, force: bool = False, persist: bool = True, **state: Any) -> None:
        from rewards.ml.progress import TrainingCancelled

        self.state = {**self.state, **state}
        if self.echo:
            self.echo(dict(self.state))
        # The cancel flag is mirrored in the cache so every report can afford to look at it.
        if cache.get(self.cancel_key):
            raise TrainingCancelled(f"job {self.job_id} cancelled")
        now = time.monotonic()
        if not persist or (not force and now - self.last < 1.0):
            return
        self.last = now
        updated = RewardTrainingJob.objects.filter(id=self.job_id).update(
            progress=self.state, heartbeat_at=timezone.now()
        )
        if updated and RewardTrainingJob.objects.filter(id=self.job_id, cancel_requested=True).exists():
            raise TrainingCancelled(f"job {self.job_id} cancelled")

    def phase(self, name: str, **state: Any) -> None:
        # Training figures stay visible after training (the final step and loss); the rest resets.
        kept = {
            k: v for k, v in self.state.items() if k in ("step", "total_steps", "epoch", "epochs", "loss")
        }
        self.state = {**kept, "phase": name, **state}
        self(force=True)


def _models_root() -> Path:
    return Path(settings.MEDIA_ROOT) / "reward_models"


def reward_job_run(*, job_id: int, progress: ProgressFn | None = None) -> RewardTrainingJob:
    """Run a queued job to the end: build its snapshot, embed what is missing, train, evaluate,
    register the version and run champion/challenger. Safe to call twice: a finished job is left as
    it is. A failure marks the job failed with the error; cancellation marks it cancelled."""
    from rewards.ml.progress import TrainingCancelled

    with transaction.atomic():
        job = (
            RewardTrainingJob.objects.select_for_update()
            .select_related("project", "encoder", "snapshot")
            .get(id=job_id)
        )
        if job.status not in (RewardTrainingJob.Status.QUEUED, RewardTrainingJob.Status.RUNNING):
            return job
        job.status = RewardTrainingJob.Status.RUNNING
        job.started_at = job.heartbeat_at = timezone.now()
        job.save(update_fields=["status", "started_at", "heartbeat_at"])
        if not job.cancel_requested:
            cache.delete(cancel_key(job))  # a stale flag (e.g. a job restored from a backup)
    report = _Reporter(job, progress)
    try:
        version = _train(job, report)
    except TrainingCancelled:
        RewardTrainingJob.objects.filter(id=job.id).update(
            status=RewardTrainingJob.Status.CANCELLED,
            finished_at=timezone.now(),
            progress={**report.state, "phase": "cancelled"},
        )
    except Exception as exc:
        log.exception("reward job %s failed", job.id)
        message = exc.message if isinstance(exc, Invalid) else f"{type(exc).__name__}: {exc}"
        RewardTrainingJob.objects.filter(id=job.id).update(
            status=RewardTrainingJob.Status.FAILED,
            finished_at=timezone.now(),
            error=message,
            progress={**report.state, "phase": "failed"},
        )
    else:
        RewardTrainingJob.objects.filter(id=job.id).update(
            status=RewardTrainingJob.Status.SUCCEEDED,
            finished_at=timezone.now(),
            progress={**report.state, "phase": "done"},
        )
        if version.is_active:
            transaction.on_commit(lambda: tasks.gpu_score_samples.delay(version.id))
    job.refresh_from_db()
    return job


def _train(job: RewardTrainingJob, report: _Reporter) -> RewardModelVersion:
    from rewards.ml import metrics
    from rewards.ml.kinds import CONFIGS, TRAINERS
    from rewards.ml.progress import Progress

    project = job.project
    report.phase("snapshot")
    snapshot = job.snapshot
    if snapshot.status != DatasetSnapshot.Status.DONE:
        # Called from inside the export's read-only transaction: no database write there.
        snapshot = snapshot_build(
            snapshot_id=snapshot.id, progress=lambda rows: report(persist=False, rows=rows)
        )
        if snapshot.status != DatasetSnapshot.Status.DONE:
            raise Invalid(f"snapshot {snapshot.id} is {snapshot.status}, not built")
    pairs = snapshot_pairs(snapshot=snapshot)
    # The launch made the same check on the same rule; judgments undone since can still fail it.
    train_idx, held_idx = split_indices(project.id, pairs.comparison, pairs.gold_comparisons, job.holdout)
    split_check(
        kind=job.kind,
        total=len(pairs.comparison),
        train=len(train_idx),
        held=len(held_idx),
        holdout=job.holdout,
    )

    report.phase("embedding", done=0, total=len(pairs.sample_ids))
    form = config_embedding_input(encoder=job.encoder, config=job.config)
    embeddings_ensure(
        encoder=job.encoder,
        sample_ids=pairs.sample_ids,
        frames=job.video_frames,
        device=job.device,
        input=form,
        progress=lambda done, total: report(done=done, total=total),
    )
    x, mask, prompt = features_load(encoder=job.encoder, sample_ids=pairs.sample_ids, input=form)
    split = pairs_split(project=project, pairs=pairs, x=x, mask=mask, prompt=prompt, holdout=job.holdout)

    # The bar to beat, on the frozen features of the job's encoder and the same held-out pairs.
    report.phase("baseline", done=0, total=1)
    baseline = _baseline(
        split, use_prompt=bool(job.config.get("use_prompt", True)), seed=int(job.config.get("seed", 0))
    )
    report(done=1)

    report.phase("training", step=0)

    def on_progress(p: Progress) -> None:
        report(
            False,
            True,
            step=p.step,
            total_steps=p.total_steps,
            epoch=p.epoch,
            epochs=p.epochs,
            loss=round(float(p.loss), 5),
            elapsed_s=round(p.elapsed_s, 1),
            eta_s=round(p.eta_s, 1),
            **{k: v for k, v in (p.metrics or {}).items() if isinstance(v, int | float)},
        )

    encoder = job.encoder
    if job.kind == "finetune":
        model, encoder, split, directory = _finetune(job, pairs, split, on_progress)
    else:
        config = CONFIGS[job.kind].from_dict(job.config)
        model = TRAINERS[job.kind](
            config,
            split.train,
            holdout=split.holdout if split.holdout.num_pairs else None,
            progress=on_progress,
        )

    # Each phase counts its own units (the CLI's bar and the admin show them): evaluation sets here.
    evaluations = [("holdout", split.holdout), ("gold", split.gold), ("majority", split.holdout)]
    report.phase("evaluating", done=0, total=len(evaluations) + 1)
    figures: dict[str, Any] = {
        "train_pairs": int(split.train.num_pairs),
        "holdout_pairs": int(split.holdout.num_pairs),
        "samples": len(split.sample_ids),
    }
    for done, (name, pair_set) in enumerate(evaluations, start=1):
        if not pair_set.num_pairs:
            figures[name] = None
        elif name == "majority":
            figures[name] = metrics.majority_agreement(model, pair_set)
        else:
            figures[name] = metrics.evaluate(model, pair_set)
        report(done=done)
    figures["baseline"] = baseline
    report(done=len(evaluations) + 1)
    holdout_figs = figures["holdout"] or {}
    figures["holdout_accuracy"] = holdout_figs.get("accuracy")
    figures["gold_accuracy"] = (figures["gold"] or {}).get("accuracy")
    figures["majority_agreement"] = (figures["majority"] or {}).get("accuracy")
    figures["ece"] = holdout_figs.get("ece")
    figures["aspect_accuracy"] = holdout_figs.get("aspect_accuracy") or {}
    figures["baseline_accuracy"] = (baseline or {}).get("accuracy")
    fit = getattr(model, "fit_summary", None)
    if fit:
        figures["fit"] = fit

    report.phase("saving")
    with transaction.atomic():
        Project.objects.select_for_update().filter(id=project.id).first()
        number = (RewardModelVersion.objects.filter(project=project).aggregate(m=Max("number"))["m"] or 0) + 1
        if job.kind != "finetune":  # a fine-tuned model was saved with its encoder already
            directory = _models_root() / project.slug / f"v{number}-{job.kind}-job{job.id}"
            model.save_pretrained(
                directory,
                extra={
                    "project": project.slug,
                    "version": number,
                    "encoder": {
                        "name": encoder.name,
                        "fingerprint": encoder.fingerprint,
                        "family": encoder.family,
                        "dim": encoder.dim,
                    },
                    "snapshot": {"id": snapshot.id, "sha256": snapshot.sha256},
                    "holdout": job.holdout,
                    "video_frames": job.video_frames,
                    "metrics": figures,
                },
            )
            # Self-contained: RewardFunction.from_pretrained(directory) needs nothing else.
            from rewards.ml.reward_fn import bundle_encoder

            bundle_encoder(directory, encoder.path)
        version = RewardModelVersion.objects.create(
            project=project,
            number=number,
            job=job,
            kind=job.kind,
            encoder=encoder,
            snapshot=snapshot,
            path=str(directory),
            metrics=figures,
            curves=list(getattr(model, "curves", []) or []),
        )
    if job.promote:
        report.phase("champion/challenger")
        version = version_decide(version=version, model=model, split=split)
    return version


BASELINE_MAX_PAIRS = 50_000


def _baseline(split: Split, *, use_prompt: bool, seed: int) -> dict[str, Any] | None:
    """``rewards.ml.baseline.logistic_baseline`` on the split (at most ``BASELINE_MAX_PAIRS`` training
    pairs, drawn with ``seed``): the held-out figures of an L2 logistic regression on the same frozen
    features, or None when there is nothing to fit or to evaluate on."""
    from rewards.ml.baseline import logistic_baseline
    from rewards.ml.data import A_WINS, B_WINS

    if not split.holdout.num_pairs:
        return None
    train = split.train
    if train.num_pairs > BASELINE_MAX_PAIRS:
        keep = np.random.default_rng(seed).choice(train.num_pairs, BASELINE_MAX_PAIRS, replace=False)
        train = train.subset(np.sort(keep))
    outcome = np.asarray(train.outcome)
    if not (((outcome == A_WINS) | (outcome == B_WINS)) & (np.asarray(train.weight) > 0)).any():
        return None
    return logistic_baseline(train, split.holdout, use_prompt=use_prompt, seed=seed).to_dict()


def _finetune(
    job: RewardTrainingJob, pairs: JudgedPairs, split: Split, on_progress: Callable[[Any], None]
) -> tuple[Any, Encoder, Split, Path]:
    """Fine-tune the encoder with a BT head on the samples themselves (an image tower: last layers or
    LoRA; a sentence encoder: LoRA, on the text alone or on prompt and text together), save it,
    register the fine-tuned encoder, and re-split with features from it, so evaluation,
    champion/challenger and scoring run the same code as for every other kind."""
    from rewards.ml.finetune.config import FinetuneConfig

    config = FinetuneConfig.from_dict(job.config)
    by_id: dict[int, Sample] = {}
    ids = list(split.sample_ids)
    for start in range(0, len(ids), 5000):
        by_id.update(Sample.objects.select_related("prompt").in_bulk(ids[start : start + 5000]))
    prompts = [by_id[sid].prompt.text for sid in ids]
    holdout = split.holdout if split.holdout.num_pairs else None
    result: Any
    if job.encoder.family == "text":
        from rewards.ml.finetune.text import TextPairs as Pairs
        from rewards.ml.finetune.text import train as finetune_train

        items: dict[str, Any] = {"texts": [by_id[sid].text for sid in ids]}
    else:
        from rewards.ml.finetune.trainer import ImagePairs as Pairs  # type: ignore[assignment]
        from rewards.ml.finetune.trainer import train as finetune_train  # type: ignore[assignment]

        items = {"images": [sample_image_open(by_id[sid]) for sid in ids]}

    def pairs_of(ps: Any) -> Any:
        return Pairs(
            **items,
            prompts=prompts,
            a=ps.a,
            b=ps.b,
            outcome=ps.outcome,
            weight=ps.weight,
            groups=ps.comparison,
        )

    result = finetune_train(
        config,
        pairs_of(split.train),
        encoder_path=job.encoder.path,
        holdout=pairs_of(holdout) if holdout is not None else None,
        progress=on_progress,
    )
    directory = _models_root() / job.project.slug / f"job{job.id}-finetune"
    result.save_pretrained(directory)
    encoder = encoder_register(path=str(directory / "encoder"))
    form = config_embedding_input(encoder=encoder, config=job.config)
    embeddings_ensure(encoder=encoder, sample_ids=ids, frames=job.video_frames, device=job.device, input=form)
    x, mask, prompt = features_load(encoder=encoder, sample_ids=ids, input=form)
    return (
        result.head,
        encoder,
        pairs_split(project=job.project, pairs=pairs, x=x, mask=mask, prompt=prompt, holdout=job.holdout),
        directory,
    )
