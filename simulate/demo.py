"""The loop demos: a project whose generator is the demo text-to-image model, judged by simulated
annotators who prefer brighter pictures, and one whose generator is the demo language model,
judged by annotators who prefer tidy answers (lists, headings, code; no rambling), each with the
closed loop switched on.

``demo_loop_seed`` (and ``demo_text_loop_seed``) trains the demo generator on first use (cached
under ``var/demo_models``), registers it as the project's base version, renders its first outputs
through a sampling job (the same path an RL round's feedback takes) so people and simulated
annotators have comparisons to judge, and sets the loop: DDPO (text: GRPO through TRL) rounds sized
for a 2-core CPU (about 20 s of RL each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from annotate import services as annotate_services
from annotate.models import Project, ProjectMember
from simulate import demo_models
from training.services.loop import loop_config_set
from training.services.sampling import (
    generator_model_register,
    sampling_job_create,
    sampling_job_queue,
    sampling_job_render,
)

SLUG = "loop"  # `up --seed-demo` names it (and the brightness preference) for its annotators
TEXT_SLUG = "loop-text"  # and this one, with the structure preference
VIDEO_SLUG = "loop-video"  # and this one, with brightness again

INSTRUCTIONS = """\
# Which picture is brighter?

This project's simulated annotators prefer **brighter, lighter** pictures; judge the same way and
your verdicts count like theirs. The loop trains a reward model on everyone's verdicts, fine-tunes
the generator with it (DDPO), then shows you the new version's pictures against the old one's on the
same prompt and seed: your verdicts on those decide whether the round helped.

Keys: `←`/`1` left, `→`/`2` right, `↑`/`3` tie, `↓`/`4` both bad, `s` skip, `u` undo.
"""

# What the base model renders and what each RL round renders for the verdicts: the same settings,
# so new and old differ only by the adapter.
RENDER = {"per_prompt": 6, "steps": 20, "guidance_scale": 3.0, "resolution": 32, "batch_size": 24}
RENDER_QUICK = {**RENDER, "per_prompt": 3, "steps": 2}  # tests: the same path, a fraction of the work

# Bolder than DDPO's defaults (lr 3e-4, clip 1e-4), so a round moves the generator visibly in
# about 20 s of CPU: with a perfect brightness reward, 16 such iterations took the demo model's mean
# brightness from 0.490 to 0.518 on its own prompts and seeds (the defaults: 0.495).
DDPO = {
    "iterations": 8, "prompts_per_iteration": 4, "images_per_prompt": 8, "train_batch_size": 16,
    "sample_steps": 10, "guidance_scale": 3.0, "resolution": 32, "timestep_fraction": 0.5,
    "inner_epochs": 1, "learning_rate": 1e-2, "clip_range": 1e-2, "lora_rank": 4, "lora_alpha": 8,
    "lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
}  # fmt: skip


def demo_generator_path() -> Path:
    return Path(settings.VAR_DIR) / "demo_models" / "text-to-image"


def demo_generator_ensure(*, quick: bool = False, progress: demo_models.Progress | None = None) -> Path:
    """The trained demo text-to-image pipeline, trained now if ``var/`` has none (a few minutes on
    2 cores; ``quick`` trains a rough one in seconds, for tests)."""
    path = demo_generator_path()
    if quick:
        path = path.with_name("text-to-image-quick")
    done = path / demo_models.DONE_FILE
    if done.is_file():
        return path
    if quick:
        return demo_models.train_text_to_image(
            path, vae_steps=10, unet_steps=10, per_prompt=2, progress=progress
        )
    return demo_models.train_text_to_image(path, progress=progress)


def demo_loop_seed(
    *,
    owner: Any,
    slug: str = SLUG,
    quick: bool = False,
    progress: demo_models.Progress | None = None,
    retrain_after: int = 40,
    verdicts_needed: int = 12,
    max_rounds: int = 6,
) -> Project:
    """Create the loop demo project (idempotent: an existing one is returned as it is). The loop's
    pace: a round starts after ``retrain_after`` new judgments and is evaluated on
    ``verdicts_needed`` verdicts, up to ``max_rounds`` rounds."""
    project = Project.objects.filter(slug=slug).first()
    if project is not None:
        return project
    path = demo_generator_ensure(quick=quick, progress=progress)
    render = RENDER_QUICK if quick else RENDER
    return _seed(
        owner=owner, slug=slug, name="Loop demo: the generator learns what annotators like",
        modality="image", instructions=INSTRUCTIONS,
        # Version names are global: another copy (the bench's) names its own generator.
        generator="demo-t2i" if slug == SLUG else f"demo-t2i-{slug}", path=path, render=render,
        within_pairs=3 if quick else 12, algorithm="ddpo", rl_config={**DDPO, "pipeline": str(path)},
        loop={"retrain_after": retrain_after, "verdicts_needed": verdicts_needed, "max_rounds": max_rounds},
    )  # fmt: skip


def _seed(
    *,
    owner: Any,
    slug: str,
    name: str,
    modality: str,
    instructions: str,
    generator: str,
    path: Path,
    render: dict[str, Any],
    within_pairs: int,
    algorithm: str,
    rl_config: dict[str, Any],
    loop: dict[str, Any],
) -> Project:
    """A loop demo project: the generator at ``path`` as its base version, its first outputs
    rendered and queued through a sampling job, and the loop switched on."""
    prompts = list(json.loads((path / demo_models.DONE_FILE).read_text())["prompts"])
    with transaction.atomic():
        project = annotate_services.project_create(
            creator=owner, slug=slug, name=name, modality=modality, instructions=instructions, aspects=[],
            overlap=1,
        )  # fmt: skip
        ProjectMember.objects.get_or_create(project=project, user=owner, defaults={"role": "manager"})
        for text in prompts:
            annotate_services.prompt_get_or_create(project=project, text=text)
        base = generator_model_register(
            project=project, actor=owner, generator=generator, version="base", path=str(path)
        )
        job = sampling_job_create(
            project=project,
            actor=owner,
            version_id=base.id,
            prompts=len(prompts),
            within_pairs=within_pairs,
            render=render,
            dispatch=False,
        )
    sampling_job_render(job_id=job.id)
    sampling_job_queue(job_id=job.id)
    loop_config_set(
        project=project,
        actor=owner,
        algorithm=algorithm,
        rl_config=rl_config,
        feedback={"prompts": len(prompts), "within_pairs": 1, "render": render},
        reward_hyperparameters={"epochs": 20},
        **loop,
    )
    return project


# --- The text loop demo --------------------------------------------------------------------------
TEXT_INSTRUCTIONS = """\
# Which answer is tidier?

This project's simulated annotators prefer **tidy answers**: a list, a heading or a code block,
and no rambling ("basically", "anyway", "!!"). Judge the same way and your verdicts count like
theirs. The loop trains a reward model on everyone's verdicts, fine-tunes the language model with
it (GRPO, through TRL), then shows you the new version's answers against the old one's on the
same prompt and seed: your verdicts on those decide whether the round helped.

Keys: `←`/`1` left, `→`/`2` right, `↑`/`3` tie, `↓`/`4` both bad, `s` skip, `u` undo.
"""

# The demo language model's answers run to about 220 tokens (the longest it was trained on: 313).
TEXT_RENDER = {"per_prompt": 6, "max_new_tokens": 256, "batch_size": 8}
TEXT_RENDER_QUICK = {**TEXT_RENDER, "per_prompt": 3, "max_new_tokens": 12}
# GRPO rounds of about 25 s on 2 cores: with the true preference as the reward, 10 such steps took
# the demo model's structure score from -0.4 to 4.0 on its prompts (32 held-out samples).
TEXT_GRPO = {
    "steps": 10, "prompts_per_step": 2, "num_generations": 8, "max_completion_length": 256,
    "learning_rate": 5e-3, "beta": 0.01, "lora_rank": 8, "lora_alpha": 16,
}  # fmt: skip
TEXT_GRPO_QUICK = {**TEXT_GRPO, "steps": 2, "num_generations": 2, "max_completion_length": 12}


def demo_text_generator_path() -> Path:
    return Path(settings.VAR_DIR) / "demo_models" / "causal-lm"


def demo_text_generator_ensure(*, quick: bool = False, progress: demo_models.Progress | None = None) -> Path:
    """The trained demo language model, trained now if ``var/`` has none (about 2.5 minutes on 2
    cores; ``quick`` trains a rough one in seconds, for tests)."""
    path = demo_text_generator_path()
    if quick:
        path = path.with_name("causal-lm-quick")
    if (path / demo_models.DONE_FILE).is_file():
        return path
    if quick:
        return demo_models.train_causal_lm(
            path, per_prompt=2, steps=10, vocab_size=600, width=32, progress=progress
        )
    return demo_models.train_causal_lm(path, progress=progress)


def demo_text_loop_seed(
    *,
    owner: Any,
    slug: str = TEXT_SLUG,
    quick: bool = False,
    progress: demo_models.Progress | None = None,
    retrain_after: int = 40,
    verdicts_needed: int = 12,
    max_rounds: int = 6,
) -> Project:
    """Create the text loop demo project (idempotent), as ``demo_loop_seed`` does for images."""
    project = Project.objects.filter(slug=slug).first()
    if project is not None:
        return project
    path = demo_text_generator_ensure(quick=quick, progress=progress)
    grpo = TEXT_GRPO_QUICK if quick else TEXT_GRPO
    return _seed(
        owner=owner, slug=slug, name="Loop demo (text): the language model learns to answer tidily",
        modality="text", instructions=TEXT_INSTRUCTIONS,
        generator="demo-lm" if slug == TEXT_SLUG else f"demo-lm-{slug}", path=path,
        render=TEXT_RENDER_QUICK if quick else TEXT_RENDER, within_pairs=3 if quick else 12,
        algorithm="text_grpo", rl_config={**grpo, "policy": str(path)},
        loop={"retrain_after": retrain_after, "verdicts_needed": verdicts_needed, "max_rounds": max_rounds},
    )  # fmt: skip


# --- The video loop demo -------------------------------------------------------------------------
VIDEO_INSTRUCTIONS = """\
# Which clip is brighter?

This project's simulated annotators prefer **brighter** clips; judge the same way and your verdicts
count like theirs. The loop trains a reward model on everyone's verdicts (frames through the image
tower, pooled over time), fine-tunes the text-to-video generator with it (Flow-GRPO), then shows you
the new version's clips against the old one's on the same prompt and seed.

Keys: `←`/`1` left, `→`/`2` right, `↑`/`3` tie, `↓`/`4` both bad, `s` skip, `u` undo.
"""

VIDEO_RENDER = {
    "per_prompt": 4, "steps": 10, "guidance_scale": 3.0, "resolution": 32, "frames": 9, "fps": 8,
    "batch_size": 8,
}  # fmt: skip
VIDEO_RENDER_QUICK = {**VIDEO_RENDER, "per_prompt": 2, "steps": 2}
VIDEO_GRPO = {
    "iterations": 6, "prompts_per_iteration": 2, "group_size": 4, "sample_steps": 8, "train_batch_size": 8,
    "frames": 9, "resolution": 32, "guidance_scale": 3.0, "learning_rate": 1e-2, "clip_range": 1e-2,
    "lora_rank": 4, "lora_alpha": 8,
}  # fmt: skip
VIDEO_GRPO_QUICK = {
    **VIDEO_GRPO, "iterations": 1, "prompts_per_iteration": 1, "group_size": 2, "sample_steps": 2,
    "train_batch_size": 2,
}  # fmt: skip


def demo_video_generator_path() -> Path:
    return Path(settings.VAR_DIR) / "demo_models" / "text-to-video"


def demo_video_generator_ensure(*, quick: bool = False, progress: demo_models.Progress | None = None) -> Path:
    """The trained demo text-to-video pipeline, trained now if ``var/`` has none (minutes on 2
    cores; ``quick`` trains a rough one in seconds, for tests)."""
    path = demo_video_generator_path()
    if quick:
        path = path.with_name("text-to-video-quick")
    if (path / demo_models.DONE_FILE).is_file():
        return path
    if quick:
        return demo_models.train_text_to_video(
            path,
            per_prompt=1,
            vae_steps=2,
            transformer_steps=2,
            batch_size=2,
            transformer_batch_size=2,
            progress=progress,
        )
    return demo_models.train_text_to_video(path, progress=progress)


def demo_video_loop_seed(
    *,
    owner: Any,
    slug: str = VIDEO_SLUG,
    quick: bool = False,
    progress: demo_models.Progress | None = None,
    retrain_after: int = 40,
    verdicts_needed: int = 12,
    max_rounds: int = 6,
) -> Project:
    """Create the video loop demo project (idempotent), as ``demo_loop_seed`` does for images."""
    project = Project.objects.filter(slug=slug).first()
    if project is not None:
        return project
    path = demo_video_generator_ensure(quick=quick, progress=progress)
    grpo = VIDEO_GRPO_QUICK if quick else VIDEO_GRPO
    return _seed(
        owner=owner, slug=slug, name="Loop demo (video): the clip generator learns what annotators like",
        modality="video", instructions=VIDEO_INSTRUCTIONS,
        generator="demo-t2v" if slug == VIDEO_SLUG else f"demo-t2v-{slug}", path=path,
        render=VIDEO_RENDER_QUICK if quick else VIDEO_RENDER, within_pairs=1 if quick else 6,
        algorithm="video_grpo", rl_config={**grpo, "pipeline": str(path)},
        loop={"retrain_after": retrain_after, "verdicts_needed": verdicts_needed, "max_rounds": max_rounds},
    )  # fmt: skip
