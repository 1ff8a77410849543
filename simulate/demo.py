"""The loop demos, one per modality, each a project with the closed loop switched on:
- ``loop``: the demo text-to-image model (DDPO), judged by simulated annotators who prefer brighter
  pictures;
- ``loop-text``: the demo language model (GRPO through TRL), judged by annotators who prefer tidy
  answers (lists, headings, code; no rambling);
- ``loop-video``: the demo clip generator (Flow-GRPO), judged by brightness.

``loop_demo_seed`` (``demo_loop_seed``, ``demo_text_loop_seed``, ``demo_video_loop_seed``) trains
the demo generator on first use (cached under ``var/demo_models``), registers it as the project's
base version, renders its first outputs through a sampling job (the same path an RL round's
feedback takes) so people and simulated annotators have comparisons to judge, and sets the loop,
with rounds sized for a 2-core CPU (about 20 s of RL each). ``DEMOS`` holds each one's settings.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
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


# --- The image loop demo's settings above; what every loop demo does --------------------------
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


@dataclass(frozen=True)
class LoopDemo:
    """One loop demo: its project, its generator (trained from code on first use), how its
    outputs are rendered and which RL algorithm its loop runs (the real settings, and ``quick``
    ones for tests: the same path, a fraction of the work)."""

    slug: str
    name: str
    modality: str
    instructions: str
    generator: str  # the generator's name (version names are global: a copy names its own)
    directory: str  # under var/demo_models
    train: Callable[..., Path]  # demo_models.train_*(directory, progress=..., **quick_training)
    quick_training: dict[str, Any]
    render: dict[str, Any]
    render_quick: dict[str, Any]
    within_pairs: tuple[int, int]  # (real, quick) pairs per prompt within the first outputs
    algorithm: str
    model_field: str
    rl: dict[str, Any]
    rl_quick: dict[str, Any]


DEMOS = {
    d.modality: d
    for d in (
        LoopDemo(
            slug=SLUG, name="Loop demo: the generator learns what annotators like", modality="image",
            instructions=INSTRUCTIONS, generator="demo-t2i", directory="text-to-image",
            train=demo_models.train_text_to_image,
            quick_training={"vae_steps": 10, "unet_steps": 10, "per_prompt": 2},
            render=RENDER, render_quick=RENDER_QUICK, within_pairs=(12, 3),
            algorithm="ddpo", model_field="pipeline", rl=DDPO, rl_quick=DDPO,
        ),
        LoopDemo(
            slug=TEXT_SLUG, name="Loop demo (text): the language model learns to answer tidily",
            modality="text", instructions=TEXT_INSTRUCTIONS, generator="demo-lm", directory="causal-lm",
            train=demo_models.train_causal_lm,
            quick_training={"per_prompt": 2, "steps": 10, "vocab_size": 600, "width": 32},
            render=TEXT_RENDER, render_quick=TEXT_RENDER_QUICK, within_pairs=(12, 3),
            algorithm="text_grpo", model_field="policy", rl=TEXT_GRPO, rl_quick=TEXT_GRPO_QUICK,
        ),
        LoopDemo(
            slug=VIDEO_SLUG, name="Loop demo (video): the clip generator learns what annotators like",
            modality="video", instructions=VIDEO_INSTRUCTIONS, generator="demo-t2v", directory="text-to-video",
            train=demo_models.train_text_to_video,
            quick_training={"per_prompt": 1, "vae_steps": 2, "transformer_steps": 2, "batch_size": 2,
                            "transformer_batch_size": 2},
            render=VIDEO_RENDER, render_quick=VIDEO_RENDER_QUICK, within_pairs=(6, 1),
            algorithm="video_grpo", model_field="pipeline", rl=VIDEO_GRPO, rl_quick=VIDEO_GRPO_QUICK,
        ),
    )
}  # fmt: skip


def generator_path(modality: str) -> Path:
    """Where the demo generator of ``modality`` is cached (trained or not)."""
    return Path(settings.VAR_DIR) / "demo_models" / DEMOS[modality].directory


def generator_ensure(
    modality: str, *, quick: bool = False, progress: demo_models.Progress | None = None
) -> Path:
    """The trained demo generator of ``modality``, trained now if ``var/`` has none (minutes on 2
    cores; ``quick`` trains a rough one in seconds, for tests)."""
    demo = DEMOS[modality]
    path = generator_path(modality)
    if quick:
        path = path.with_name(f"{demo.directory}-quick")
    if (path / demo_models.DONE_FILE).is_file():
        return path
    return demo.train(path, progress=progress, **(demo.quick_training if quick else {}))


def loop_demo_seed(
    modality: str,
    *,
    owner: Any,
    slug: str = "",
    quick: bool = False,
    progress: demo_models.Progress | None = None,
    retrain_after: int = 40,
    verdicts_needed: int = 12,
    max_rounds: int = 6,
) -> Project:
    """Create the loop demo project of ``modality`` (idempotent: an existing one is returned as it
    is). The loop's pace: a round starts after ``retrain_after`` new judgments and is evaluated on
    ``verdicts_needed`` verdicts, up to ``max_rounds`` rounds."""
    demo = DEMOS[modality]
    slug = slug or demo.slug
    project = Project.objects.filter(slug=slug).first()
    if project is not None:
        return project
    path = generator_ensure(modality, quick=quick, progress=progress)
    return _seed(
        owner=owner, slug=slug, name=demo.name, modality=modality, instructions=demo.instructions,
        generator=demo.generator if slug == demo.slug else f"{demo.generator}-{slug}", path=path,
        render=demo.render_quick if quick else demo.render, within_pairs=demo.within_pairs[1 if quick else 0],
        algorithm=demo.algorithm, rl_config={**(demo.rl_quick if quick else demo.rl), demo.model_field: str(path)},
        loop={"retrain_after": retrain_after, "verdicts_needed": verdicts_needed, "max_rounds": max_rounds},
    )  # fmt: skip


# The names the commands, the benches and the tests use.
demo_loop_seed = functools.partial(loop_demo_seed, "image")
demo_text_loop_seed = functools.partial(loop_demo_seed, "text")
demo_video_loop_seed = functools.partial(loop_demo_seed, "video")
demo_generator_ensure = functools.partial(generator_ensure, "image")


def demo_generator_path() -> Path:
    return generator_path("image")


def demo_text_generator_path() -> Path:
    return generator_path("text")


def demo_video_generator_path() -> Path:
    return generator_path("video")
