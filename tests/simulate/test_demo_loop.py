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
        assert not Project.objects.filter(slug=demo.TEXT_SLUG).exists()  # `up` seeds it in the background
        call_command("seed_demo", text_loop=True, quick_generator=True)
    assert path == tmp_path / "demo_models" / "text-to-image-quick"
    info = json.loads((path / demo_models.DONE_FILE).read_text())
    prompts = info["prompts"]
    assert prompts == demo_models.generators.DEMO_PROMPTS["image"] and info["resolution"] == 32
    assert Project.objects.filter(slug=demo.SLUG).count() == 1
    # The text loop demo, seeded on its own (its own test below runs its rounds).
    text = Project.objects.get(slug=demo.TEXT_SLUG)
    assert text.modality == "text" and LoopConfig.objects.get(project=text).algorithm == "text_grpo"

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


def test_the_text_loop_demo_runs_rounds_that_build_on_each_other(tmp_path: Path) -> None:
    """The text loop demo: the demo language model (trained from code, loaded back with plain
    transformers) is the base; a GRPO round through TRL on the reward model of the annotators'
    verdicts; people prefer it, so the next round continues its LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards.services import reward_job_run
    from tests.rewards.helpers import simulate
    from training import services

    owner = get_user_model().objects.create_user("owner", is_staff=True)
    with override_settings(VAR_DIR=tmp_path):
        project = demo.demo_text_loop_seed(
            owner=owner, quick=True, retrain_after=16, verdicts_needed=3, max_rounds=2
        )
    path = tmp_path / "demo_models" / "causal-lm-quick"
    info = json.loads((path / demo_models.DONE_FILE).read_text())
    assert info["kind"] == "causal_lm" and info["prompts"] == demo_models.generators.DEMO_PROMPTS["text"]
    # Plain transformers loads it; its byte-level tokenizer gives back markdown exactly.
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    answer = "### Title\n\n1. **Bold**: `code`\n- Ünïcode <script>\n"
    assert tokenizer.decode(tokenizer(answer).input_ids) == answer
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    from training.models import SamplingJob

    assert [(j.status, j.error) for j in SamplingJob.objects.filter(project=project)] == [("succeeded", "")]
    texts = Sample.objects.filter(project=project)
    assert texts.count() == 8 * demo.TEXT_RENDER_QUICK["per_prompt"]
    assert {s.modality for s in texts} == {"text"} and all(s.generator_version_id for s in texts)
    config = LoopConfig.objects.get(project=project)
    assert config.enabled and config.algorithm == "text_grpo" and config.rl_config["policy"] == str(path)

    def tick() -> Any:
        r = services.loop_tick(project_id=project.id, dispatch=False)
        assert r is not None
        return r

    def longer(a: Sample, b: Sample) -> int:
        return a.id if len(a.text) >= len(b.text) else b.id

    def newer(a: Sample, b: Sample) -> int:  # the RL round's output wins
        a_new = bool(a.generator_version and a.generator_version.generator.name.endswith("-rl"))
        return a.id if a_new else b.id

    judge = owner  # the manager judges too: their verdicts count like anyone's
    assert LoopConfig.objects.get(project=project).retrain_after == 16
    assert tick().state == "waiting_for_labels"
    assert simulate(project, judge, longer, noise=0.0, limit=16) == 16
    r = tick()
    assert r.state == "reward_training" and r.reward_job is not None, r.reason
    assert reward_job_run(job_id=r.reward_job.id).status == "succeeded"
    r = tick()
    assert r.state == "rl" and r.rl_job is not None and r.rl_job.algorithm == "text_grpo"
    assert services.rl_job_run(job_id=r.rl_job.id).status == "succeeded", r.rl_job.error
    r = tick()
    assert r.state == "sampling" and r.sampling_job is not None
    services.sampling_job_render(job_id=r.sampling_job.id)
    assert services.sampling_job_queue(job_id=r.sampling_job.id).status == "succeeded"
    assert tick().state == "awaiting_verdicts"
    simulate(project, judge, newer, noise=0.0)
    r = tick()
    assert r.state == "evaluated" and r.human_win_rate == 1.0, r.reason
    first = r.new_version
    assert first is not None and first.metadata["adapter"] is True

    # Round 2 continues round 1's adapter, which is its incumbent.
    r2 = tick()
    assert (r2.number, r2.state) == (2, "waiting_for_labels")
    r2 = tick()  # round 1's verdicts (and everything judged since its reward job) are its new labels
    assert r2.state == "reward_training" and r2.reward_job is not None, r2.reason
    assert reward_job_run(job_id=r2.reward_job.id).status == "succeeded"
    r2 = tick()
    assert r2.state == "rl" and r2.rl_job is not None
    assert r2.rl_job.start_version == first and r2.incumbent == first
    assert r2.rl_job.config["init_lora"] == first.checkpoint
    assert services.rl_job_run(job_id=r2.rl_job.id).status == "succeeded", r2.rl_job.error


def test_the_video_loop_demo_is_seeded_with_a_trained_clip_generator(tmp_path: Path) -> None:
    """The short-clip variant: a Wan-like pipeline trained from code on procedural clips, loaded
    back with plain diffusers, its first clips rendered and queued, and a Flow-GRPO loop on."""
    from diffusers import WanPipeline

    owner = get_user_model().objects.create_user("owner", is_staff=True)
    with override_settings(VAR_DIR=tmp_path):
        project = demo.demo_video_loop_seed(owner=owner, quick=True)
        assert demo.demo_video_loop_seed(owner=owner, quick=True) == project  # idempotent
    path = tmp_path / "demo_models" / "text-to-video-quick"
    info = json.loads((path / demo_models.DONE_FILE).read_text())
    assert info["kind"] == "text_to_video" and (info["resolution"], info["frames"]) == (32, 9)
    assert info["prompts"] == demo_models.generators.DEMO_PROMPTS["video"]
    clips = Sample.objects.filter(project=project)
    assert clips.count() == 8 * demo.VIDEO_RENDER_QUICK["per_prompt"]
    assert {(s.modality, s.mime_type, s.width, s.height) for s in clips} == {("video", "video/mp4", 32, 32)}
    assert Comparison.objects.filter(project=project).count() == 8  # one within-pair per prompt
    config = LoopConfig.objects.get(project=project)
    assert config.enabled and config.algorithm == "video_grpo" and config.rl_config["pipeline"] == str(path)
    # The saved generator is a plain diffusers WanPipeline; the VAE carries its latent statistics.
    pipe = WanPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.latents_std != [1.0] * pipe.vae.config.z_dim
    frames = pipe(
        info["prompts"][0], num_inference_steps=2, height=32, width=32, num_frames=9, guidance_scale=1.0,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert np.asarray(frames).shape == (1, 9, 32, 32, 3) and np.isfinite(frames).all()
