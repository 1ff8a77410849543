"""Generators as models we run, and their outputs put in front of people.

- ``generator_model_register``: a generator version whose checkpoint is a local model directory,
  checked from its files at registration (``training.ml.model_dirs``).
- ``sampling_job_create`` -> ``sampling_job_render`` (``gpu`` queue) -> ``sampling_job_queue``
  (``default`` queue): render a version's outputs for a set of prompts into samples, with the seed
  and settings in each sample's metadata, score them under the project's active reward model, then
  queue comparisons, tagged with the round: the new version against the incumbent on the same
  prompt and seed (first, in a fixed order fair to every prompt), and pairs within the new
  version's group (with active-learning priorities).

Rendering is idempotent: a version's sample for (prompt, seed, settings) that is already stored is
reused, so a job requeued after its worker died renders only what is missing, and the incumbent's
outputs are rendered once across rounds.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from annotate.errors import Invalid, NotFound
from annotate.models import Comparison, GeneratorVersion, ProjectMember, Prompt, Sample
from annotate.selectors import member_role_require
from annotate.services import (
    comparisons_create,
    generator_version_register,
    sample_create_media,
    sample_create_texts,
)
from rewards.models import RewardModelVersion
from training import tasks
from training.ml.configs import ConfigError
from training.ml.model_dirs import ModelDir, ModelDirError
from training.ml.render import RenderConfig, resolve
from training.models import RLJob, SamplingJob

MAX_PROMPTS = 10_000  # prompts one sampling job renders
MAX_OUTPUTS = 20_000  # prompts x per_prompt


def _kind_fits(project: Any, modality: str) -> None:
    if project.modality and project.modality != modality:
        raise Invalid(
            f"this project holds {project.modality}; the model generates {modality}", code="wrong_modality"
        )


def _inspect(path: str, base: str = "") -> tuple[ModelDir, ModelDir | None]:
    try:
        return resolve(path, base)
    except ModelDirError as exc:
        raise Invalid(f"model: {exc}", code="bad_model") from exc


def generator_model_register(
    *, project: Any, actor: Any, generator: str, version: str, path: str, base: str = ""
) -> GeneratorVersion:
    """Register (or update) a generator version that is a local model directory: a diffusers
    pipeline, a transformers causal LM, or a LoRA adapter with its ``base``. Refused with ``Invalid``
    (nothing stored) when the directory is missing, truncated or of the wrong kind, or generates
    another modality than the project's."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    info, base_info = _inspect(path, base)
    model = base_info or info
    _kind_fits(project, model.modality)
    existing = GeneratorVersion.objects.filter(generator__name=generator, name=version).first()
    if existing is not None and existing.metadata.get("project") not in (None, project.slug):
        raise Invalid(f"{generator}@{version} belongs to another project", code="taken")
    return generator_version_register(
        generator=generator,
        version=version,
        checkpoint=str(info.path),
        metadata={
            "project": project.slug,
            "kind": model.kind,
            "class": model.class_name,
            "modality": model.modality,
            "base": str(base_info.path) if base_info else "",
            "adapter": info.kind == "lora",
        },
    )


def generator_models_of(*, project: Any) -> list[GeneratorVersion]:
    """The project's generator versions that are models (newest first, at most 500)."""
    return list(
        GeneratorVersion.objects.filter(metadata__project=project.slug, is_external=False)
        .select_related("generator")
        .order_by("-id")[:500]
    )


def base_version_for(*, project: Any, path: str) -> GeneratorVersion:
    """The generator version of a base model directory an RL job starts from: the project's
    registered version with that checkpoint, else one registered now as ``<slug>-base``."""
    found = (
        GeneratorVersion.objects.filter(
            checkpoint=str(Path(path)), is_external=False, metadata__project=project.slug
        )
        .order_by("-id")
        .first()
    )
    if found is not None:
        return found
    info, _ = _inspect(path)
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return generator_version_register(
        generator=f"{project.slug}-base",
        version=f"{Path(path).name}-{digest}",
        checkpoint=str(Path(path)),
        metadata={
            "project": project.slug,
            "kind": info.kind,
            "class": info.class_name,
            "modality": info.modality,
            "base": "",
            "adapter": False,
        },
    )


def _version(project: Any, version_id: int, *, what: str) -> GeneratorVersion:
    v = GeneratorVersion.objects.filter(id=version_id).select_related("generator").first()
    mine = v is not None and (
        v.metadata.get("project") == project.slug
        or Sample.objects.filter(project=project, generator_version=v).exists()  # uploaded outputs
    )
    if v is None or not mine:
        raise NotFound(f"{what}: no generator version {version_id} of {project.slug}")
    if v.is_external or not v.checkpoint:
        raise Invalid(f"{what}: {v} is uploaded outputs, not a model that can render", code="bad_version")
    info, base_info = _inspect(v.checkpoint, str(v.metadata.get("base") or ""))
    _kind_fits(project, (base_info or info).modality)
    return v


def sampling_check(
    *, project: Any, prompts: int, within_pairs: int, render: Any, incumbent: bool
) -> tuple[RenderConfig, list[int]]:
    """The validated render config and the prompt ids (the project's newest ``prompts``) of a
    sampling job; ``Invalid`` (codes ``bad_config``, ``no_prompts``, ``not_pairwise``)."""
    if project.k != 2:
        raise Invalid(
            f"sampling jobs queue pairwise comparisons; this project ranks {project.k} at a time",
            code="not_pairwise",
        )
    try:
        config = RenderConfig.from_dict(render or {})
    except ConfigError as exc:
        raise Invalid(f"render: {exc}", code="bad_config") from exc
    if not 1 <= prompts <= MAX_PROMPTS:
        raise Invalid(f"prompts must be 1..{MAX_PROMPTS}", code="bad_config")
    if prompts * config.per_prompt > MAX_OUTPUTS:
        raise Invalid(f"prompts x per_prompt must be at most {MAX_OUTPUTS}", code="bad_config")
    most = config.per_prompt * (config.per_prompt - 1) // 2
    if not 0 <= within_pairs <= most:
        raise Invalid(
            f"within_pairs must be 0..{most} (pairs of {config.per_prompt} outputs per prompt)",
            code="bad_config",
        )
    if not incumbent and within_pairs == 0:
        raise Invalid("nothing to compare: give an incumbent or within_pairs > 0", code="bad_config")
    ids = list(Prompt.objects.filter(project=project).order_by("-id").values_list("id", flat=True)[:prompts])
    if not ids:
        raise Invalid("the project has no prompts to sample from", code="no_prompts")
    return config, sorted(ids)


def next_round(project: Any) -> int:
    top = SamplingJob.objects.filter(project=project).aggregate(m=Max("round"))["m"]
    return int(top or 0) + 1


def sampling_job_create(
    *,
    project: Any,
    actor: Any | None,
    version_id: int,
    incumbent_id: int | None = None,
    prompts: int = 16,
    within_pairs: int = 1,
    render: dict[str, Any] | None = None,
    round: int | None = None,
    rl_job: RLJob | None = None,
    dispatch: bool = True,
) -> SamplingJob:
    """Validate and queue a sampling job (``gpu`` queue). ``actor=None`` is for internal callers (an
    RL job's feedback, the loop). Every refusal is an ``Invalid``/``NotFound`` with nothing stored."""
    if actor is not None:
        member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    version = _version(project, version_id, what="version")
    incumbent = _version(project, incumbent_id, what="incumbent") if incumbent_id is not None else None
    if incumbent is not None and incumbent.id == version.id:
        raise Invalid("the incumbent is the version itself", code="bad_config")
    config, prompt_ids = sampling_check(
        project=project,
        prompts=prompts,
        within_pairs=within_pairs,
        render=render,
        incumbent=incumbent is not None,
    )
    if round is not None and not 1 <= round <= 1_000_000:
        raise Invalid("round must be 1..1000000", code="bad_config")
    total = len(prompt_ids) * config.per_prompt * (2 if incumbent else 1)
    with transaction.atomic():
        job = SamplingJob.objects.create(
            project=project,
            version=version,
            incumbent=incumbent,
            rl_job=rl_job,
            round=round or next_round(project),
            prompt_ids=prompt_ids,
            within_pairs=within_pairs,
            config=config.to_dict(),
            total=total,
            created_by=actor,
        )
        if dispatch:
            transaction.on_commit(lambda: tasks.gpu_sampling_job_render.delay(job.id))
    return job


def _existing(
    job: SamplingJob, version: GeneratorVersion, settings: dict[str, Any]
) -> dict[tuple[int, int], int]:
    rows = Sample.objects.filter(
        project_id=job.project_id,
        generator_version=version,
        prompt_id__in=job.prompt_ids,
        metadata__render=settings,
    ).values_list("prompt_id", "metadata__seed", "id")
    return {(int(p), int(s)): int(i) for p, s, i in rows if isinstance(s, int)}


def _store(
    job: SamplingJob, version: GeneratorVersion, out: Any, settings: dict[str, Any]
) -> tuple[int, bool]:
    meta: dict[str, Any] = {
        "seed": out.seed,
        "render": settings,
        "sampling_job": job.id,
        "round": job.round,
        **{k: settings[k] for k in ("steps", "guidance_scale") if k in settings},
    }
    names = {"generator": version.generator.name, "generator_version": version.name}
    if out.extension:
        got = sample_create_media(
            project=job.project,
            actor=None,
            file=io.BytesIO(out.data),
            filename=f"render.{out.extension}",
            prompt=out.prompt,
            metadata=meta,
            **names,
        )
    else:
        got = sample_create_texts(
            project=job.project,
            actor=None,
            items=[{"text": out.text, "prompt": out.prompt, "metadata": meta, **names}],
        )[0]
    return got.sample.id, got.created


def sampling_job_render(*, job_id: int) -> SamplingJob:
    """Render what the job's versions have not rendered yet (reusing stored samples), store the
    samples, score them under the project's active reward model, then hand the job to
    ``sampling_job_queue`` on the default queue. A failure marks the job failed with its reason."""
    from rewards.services.scoring import version_score_samples
    from training.ml.render import load_generator

    with transaction.atomic():
        job = SamplingJob.objects.select_for_update().select_related("project").get(id=job_id)
        if job.status not in (SamplingJob.Status.QUEUED, SamplingJob.Status.RENDERING):
            return job
        job.status, job.started_at = SamplingJob.Status.RENDERING, job.started_at or timezone.now()
        job.save(update_fields=["status", "started_at"])
    try:
        config = RenderConfig.from_dict(job.config)
        texts = dict(Prompt.objects.filter(id__in=job.prompt_ids).values_list("id", "text"))
        seeds = [config.seed + i for i in range(config.per_prompt)]
        wanted = [(p, s) for p in job.prompt_ids if p in texts for s in seeds]
        outputs: dict[str, list[list[int]]] = {}
        done = created = reused = 0
        versions = [("new", job.version)] + ([("incumbent", job.incumbent)] if job.incumbent else [])
        for role, version in versions:
            assert version is not None
            modality = str(version.metadata.get("modality") or job.project.modality)
            settings = config.settings(modality)
            have = _existing(job, version, settings)
            missing = [(p, s) for p, s in wanted if (p, s) not in have]
            reused += len(wanted) - len(missing)
            done += len(wanted) - len(missing)
            SamplingJob.objects.filter(id=job.id).update(done=done)
            if missing:
                generator = load_generator(
                    version.checkpoint, base=str(version.metadata.get("base") or ""), config=config
                )
                for start in range(0, len(missing), config.batch_size):
                    chunk = missing[start : start + config.batch_size]
                    for (p, _s), out in zip(
                        chunk,
                        generator.render([texts[p] for p, _ in chunk], [s for _, s in chunk]),
                        strict=True,
                    ):
                        sample_id, new = _store(job, version, out, settings)
                        have[(p, out.seed)] = sample_id
                        created += int(new)
                        reused += int(not new)
                    done += len(chunk)
                    SamplingJob.objects.filter(id=job.id).update(done=done)
                del generator
            outputs[role] = [[p, s, have[(p, s)]] for p, s in wanted]
        active = RewardModelVersion.objects.filter(project=job.project, is_active=True).first()
        if active is not None:
            version_score_samples(version_id=active.id, only_new=True)
    except Exception as exc:  # the job's own failure (a model that will not load, a bad output), recorded
        SamplingJob.objects.filter(id=job.id).update(
            status=SamplingJob.Status.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        job.refresh_from_db()
        return job
    with transaction.atomic():
        SamplingJob.objects.filter(id=job.id).update(
            status=SamplingJob.Status.RENDERED,
            outputs=outputs,
            samples_created=created,
            samples_reused=reused,
            rendered_at=timezone.now(),
        )
        transaction.on_commit(lambda: tasks.sampling_job_queue.delay(job.id))
    job.refresh_from_db()
    return job


# The new-vs-incumbent comparisons are served before everything else, in their own order.
VERSUS_PRIORITY = 10.0  # above any active-learning priority (uncertainty in [0, 1] + 2 x spread)


def _versus_order(job: SamplingJob, pairs: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    """The new-vs-incumbent pairs ``(prompt, seed, new, incumbent)`` in the order people should see
    them: round-robin over the prompts (in a shuffled order), each prompt's seeds shuffled. The guard
    judges a round on the first verdicts, so those must be a fair sample of its outputs: ordered by
    the reward model's uncertainty, they fell on the few prompts where it was unsure, which said
    nothing of the round (a version brighter on average was flagged). Reproducible per job."""
    rng = random.Random(f"versus:{job.id}")
    by_prompt: dict[int, list[tuple[int, int]]] = {}
    for p, _s, mine, inc in sorted(pairs):
        by_prompt.setdefault(p, []).append((mine, inc))
    prompts = sorted(by_prompt)
    rng.shuffle(prompts)
    for p in prompts:
        rng.shuffle(by_prompt[p])
    order: list[tuple[int, int]] = []
    for depth in range(max((len(v) for v in by_prompt.values()), default=0)):
        order.extend(by_prompt[p][depth] for p in prompts if depth < len(by_prompt[p]))
    return order


def _specs(job: SamplingJob) -> tuple[list[dict[str, Any]], int]:
    new = {(p, s): i for p, s, i in job.outputs.get("new", [])}
    specs: list[dict[str, Any]] = []
    identical = 0
    versus: list[tuple[int, int, int, int]] = []
    for p, s, inc in job.outputs.get("incumbent", []):
        mine = new.get((p, s))
        if mine is None:
            continue
        if mine == inc:  # the same bytes: one sample, nothing to judge
            identical += 1
            continue
        versus.append((p, s, mine, inc))
    order = _versus_order(job, versus)
    for k, (mine, inc) in enumerate(order):
        priority = VERSUS_PRIORITY + (len(order) - k) / (len(order) + 1)
        specs.append({"samples": [mine, inc], "priority": priority, "priority_fixed": True})
    groups: dict[int, list[int]] = {}
    for (p, _s), i in sorted(new.items()):
        if i not in groups.setdefault(p, []):
            groups[p].append(i)
    for p, ids in sorted(groups.items()):
        pairs = list(itertools.combinations(ids, 2))
        random.Random(f"{job.id}:{p}").shuffle(pairs)  # which pairs: reproducible per job and prompt
        specs.extend({"samples": list(pair)} for pair in pairs[: job.within_pairs])
    return specs, identical


def sampling_job_queue(*, job_id: int) -> SamplingJob:
    """Queue a rendered job's comparisons (new vs incumbent on the same prompt and seed, then
    ``within_pairs`` pairs per prompt within the new group), tagged ``loop`` with the job's round;
    all in one transaction, claimed so a second run of the task queues nothing twice. The versus
    comparisons come first, in a fixed prompt-stratified order (``_versus_order``) that active
    learning leaves alone until the loop has its verdicts; the within-group pairs get priorities
    from the active reward model's uncertainty."""
    from rewards.services.scoring import comparison_priorities_update

    with transaction.atomic():
        job = SamplingJob.objects.select_for_update().select_related("project").get(id=job_id)
        if job.status != SamplingJob.Status.RENDERED:
            return job
        specs, identical = _specs(job)
        made = (
            comparisons_create(
                project=job.project,
                actor=None,
                specs=specs,
                origin=Comparison.Origin.LOOP,
                origin_round=job.round,
            )
            if specs
            else []
        )
        active = RewardModelVersion.objects.filter(project=job.project, is_active=True).first()
        if made and active is not None:
            comparison_priorities_update(version=active, created_after=job.rendered_at)
        job.comparisons_created, job.identical = len(made), identical
        job.status, job.finished_at = SamplingJob.Status.SUCCEEDED, timezone.now()
        job.save(update_fields=["comparisons_created", "identical", "status", "finished_at"])
    return job
