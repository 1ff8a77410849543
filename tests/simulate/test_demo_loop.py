"""The loop demo that `make demo` seeds: the demo generator trains from code (nothing downloaded),
loads back with plain diffusers, renders the project's first comparisons, and the loop is on with
settings the RL launch accepts. The quick generator (a few dozen steps) stands in for the real one
(minutes) here; the training code is the same."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client, override_settings

from annotate.models import Comparison, Project, Sample
from simulate import demo, demo_models
from training.models import LoopConfig

pytestmark = pytest.mark.django_db


def test_the_loop_demo_is_seeded_with_a_trained_generator_and_the_loop_on(tmp_path: Path) -> None:
    with override_settings(VAR_DIR=tmp_path):
        call_command("seed_demo", loop=True, quick_generator=True, prompts=1)
        path = demo.demo_generator_ensure(quick=True)
        project = Project.objects.get(slug=demo.SLUG)
        demo_user = get_user_model().objects.get(username="demo")
        assert demo.demo_loop_seed(owner=demo_user, quick=True) == project  # idempotent
        call_command("seed_demo", loop=True, quick_generator=True, prompts=1)  # a second run: nothing new
    assert path == tmp_path / "demo_models" / "text-to-image-quick"
    info = json.loads((path / demo_models.DONE_FILE).read_text())
    prompts = info["prompts"]
    assert prompts == demo_models.generators.DEMO_PROMPTS["image"] and info["resolution"] == 32
    assert Project.objects.filter(slug=demo.SLUG).count() == 1

    # Its first outputs: every prompt x 3 seeds from the base version (6 in the real demo), all
    # 3 pairs per prompt queued.
    samples = Sample.objects.filter(project=project)
    assert samples.count() == len(prompts) * demo.RENDER_QUICK["per_prompt"] == 8 * 3
    assert {s.generator_version.name for s in samples if s.generator_version} == {"base"}
    assert all(s.generator_version_id for s in samples)
    assert {(s.width, s.height) for s in samples} == {(32, 32)}
    assert Comparison.objects.filter(project=project).count() == len(prompts) * 3

    config = LoopConfig.objects.get(project=project)
    assert config.enabled and not config.paused and config.algorithm == "ddpo"
    assert config.rl_config["pipeline"] == str(path) and config.rl_config["init_lora"] == ""
    assert (config.retrain_after, config.verdicts_needed, config.max_rounds) == (40, 12, 6)

    # The saved generator is a plain diffusers pipeline: it loads and renders outside the app.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompts[0], num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    web = Client()
    web.force_login(demo_user)
    page = web.get(f"/projects/{demo.SLUG}/loop/").content.decode()
    assert "ddpo; retrain after 40 new judgments" in page


def test_training_the_demo_generator_reports_progress_and_saves_a_whole_pipeline(tmp_path: Path) -> None:
    seen: dict[str, list[int]] = {}

    def progress(phase: str, step: int, steps: int) -> None:
        seen.setdefault(phase, []).append(step)

    out = demo_models.train_text_to_image(
        tmp_path / "t2i", prompts=["a red circle", "a blue square"], per_prompt=4, vae_steps=3,
        unet_steps=4, batch_size=4, progress=progress,
    )  # fmt: skip
    assert seen == {"vae": [1, 2, 3], "unet": [1, 2, 3, 4]}
    info: dict[str, Any] = json.loads((out / demo_models.DONE_FILE).read_text())
    assert info["prompts"] == ["a red circle", "a blue square"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [
            "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae",
            demo_models.DONE_FILE,
        ]
    )  # fmt: skip
    assert not list(tmp_path.glob(".*tmp*"))  # written to a temporary directory, renamed at the end
