"""DDPO on a tiny random Stable Diffusion-like pipeline (saved with save_pretrained, loaded with
from_pretrained): the DDIM step's log-probability, on-policy before the first update, real
optimizer steps, checkpoints that load into a plain diffusers pipeline, resuming, refusals, and a
toy problem where the reward is known (brightness) and must rise."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from simulate.tiny_models import tiny_sd_pipeline
from training.ml.configs import ConfigError
from training.ml.ddpo.config import DDPOConfig
from training.ml.ddpo.trainer import train
from training.ml.diffusion.ddim import ddim_step_with_logprob
from training.ml.diffusion.lora import LORA_WEIGHTS, RUN_CONFIG, add_unet_lora, save_checkpoint

PROMPTS = ["a red square", "a blue circle", "a green star"]


@cache
def _pipeline_dir() -> Path:
    import tempfile

    return tiny_sd_pipeline(Path(tempfile.mkdtemp(prefix="tiny-sd-")) / "pipe")


def brightness(prompts: list[str], images: list[Any]) -> list[float]:
    return [float(np.asarray(im, dtype=np.float64).mean() / 255.0) for im in images]


def _config(**kw: Any) -> DDPOConfig:
    base: dict[str, Any] = {
        "pipeline": str(_pipeline_dir()),
        "iterations": 1,
        "prompts_per_iteration": 2,
        "images_per_prompt": 2,
        "sample_steps": 4,
        "train_batch_size": 2,
        "guidance_scale": 2.0,
    }
    base.update(kw)
    return DDPOConfig.from_dict(base)


def test_ddim_step_matches_diffusers_and_its_log_prob_is_the_gaussian_density() -> None:
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False
    )
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    eps = torch.randn(3, 4, 8, 8)
    t = scheduler.timesteps[3]
    noise = torch.randn(3, 4, 8, 8)
    theirs = scheduler.step(eps, t, x, eta=0.7, variance_noise=noise).prev_sample
    ours, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, eta=0.7, prev_sample=theirs)
    assert torch.allclose(ours, theirs)
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = 0.7 * float(scheduler._get_variance(int(t), prev_t)) ** 0.5
    expected = (-(noise**2) / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-4)
    # Drawn with the same generator, our step gives diffusers' sample.
    drawn, _ = ddim_step_with_logprob(
        scheduler, eps, t, x, eta=0.7, generator=torch.Generator().manual_seed(5)
    )
    again = scheduler.step(eps, t, x, eta=0.7, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.allclose(drawn, again, atol=1e-6)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(scheduler, eps, t, x, eta=0.0)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / LORA_WEIGHTS))


def test_one_iteration_is_on_policy_changes_the_weights_and_loads_into_plain_diffusers(
    tmp_path: Path,
) -> None:
    result = train(_config(), PROMPTS, brightness, output_dir=tmp_path)
    (m,) = result.metrics
    assert m.first_ratio_error == 0.0  # recomputed log-probs equal the sampled ones before the update
    assert math.isfinite(m.loss) and 0.0 <= m.clip_fraction <= 1.0
    (ckpt,) = result.checkpoints
    assert ckpt == tmp_path / "checkpoint-1" and (ckpt / RUN_CONFIG).is_file()
    weights = _lora(ckpt)
    assert weights and all(k.startswith("unet.") for k in weights)
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # B starts at zero: the step moved it
    # Outside the app: a plain pipeline with load_lora_weights.
    pipe = StableDiffusionPipeline.from_pretrained(str(_pipeline_dir()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "guidance_scale": 1.0}
    base = pipe("a red square", generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe.load_lora_weights(str(ckpt))
    tuned = pipe("a red square", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert base.shape == tuned.shape and not np.allclose(base, tuned)


def test_a_checkpoint_loads_whole_into_plain_diffusers_with_convolutions_targeted(tmp_path: Path) -> None:
    """LoRA on attention and on convolutions (the demo's targets): plain ``load_lora_weights``
    loads every one of the checkpoint's layers with its values, not only some of them."""
    pipe = StableDiffusionPipeline.from_pretrained(str(_pipeline_dir()), local_files_only=True)
    add_unet_lora(pipe.unet, rank=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    save_checkpoint(StableDiffusionPipeline, pipe.unet, tmp_path / "ckpt", config={})
    saved = _lora(tmp_path / "ckpt")
    plain = StableDiffusionPipeline.from_pretrained(str(_pipeline_dir()), local_files_only=True)
    plain.load_lora_weights(str(tmp_path / "ckpt"))
    loaded = {n: p for n, p in plain.unet.named_parameters() if "lora_B" in n}
    ours = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert len(loaded) == len(ours) == len([k for k in saved if "lora_B" in k]) == 48
    by_module = {n.split(".lora_B")[0]: p for n, p in loaded.items()}
    assert all(torch.equal(by_module[n.split(".lora_B")[0]], p) for n, p in ours.items())


def test_resuming_from_a_checkpoint_continues_the_run_exactly(tmp_path: Path) -> None:
    whole = train(_config(iterations=2, checkpoint_every=1), PROMPTS, brightness, output_dir=tmp_path / "a")
    resumed = train(
        _config(iterations=2, checkpoint_every=1),
        PROMPTS,
        brightness,
        output_dir=tmp_path / "b",
        resume_from=tmp_path / "a" / "checkpoint-1",
    )
    assert [m.iteration for m in resumed.metrics] == [2]
    a, b = whole.metrics[1], resumed.metrics[0]
    assert (a.reward_mean, a.loss, a.approx_kl) == (b.reward_mean, b.loss, b.approx_kl)
    wa, wb = _lora(tmp_path / "a" / "checkpoint-2"), _lora(tmp_path / "b" / "checkpoint-2")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_continues_a_previous_runs_adapter(tmp_path: Path) -> None:
    """``init_lora``: a run starts from a previous run's adapter (the loop's next round); an adapter
    of another shape, or a directory without one, is refused by name."""
    first = train(_config(iterations=1), PROMPTS, brightness, output_dir=tmp_path / "a")
    start = _lora(first.checkpoints[0])
    assert any(float(v.abs().max()) > 0 for k, v in start.items() if "lora_B" in k or "lora.up" in k)
    # A tiny learning rate: the continued adapter ends where it started (a fresh one would have
    # B = 0 and other random A), and its samples differ from a fresh adapter's.
    cont = train(
        _config(init_lora=str(first.checkpoints[0]), learning_rate=1e-7),
        PROMPTS,
        brightness,
        output_dir=tmp_path / "b",
    )
    weights = _lora(cont.checkpoints[0])
    assert weights.keys() == start.keys()
    assert all(torch.allclose(weights[k], start[k], atol=1e-5) for k in start)
    assert cont.metrics[0].reward_mean != first.metrics[0].reward_mean
    with pytest.raises(ValueError, match="do not fit this adapter"):
        train(
            _config(init_lora=str(tmp_path / "a" / "checkpoint-1"), lora_rank=8),
            PROMPTS,
            brightness,
            output_dir=tmp_path / "d",
        )
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        train(_config(init_lora=str(tmp_path)), PROMPTS, brightness, output_dir=tmp_path / "e")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eta": 0.0}, "eta must be in"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"learning_rate": 1.0}, "learning_rate"),
        ({"dtype": "float16"}, "float16 needs a GPU"),
        ({"iterations": "ten"}, "iterations: expected int"),
        ({"nonsense": 1}, "unknown setting"),
        ({"pipeline": ""}, "pipeline"),
    ],
)
def test_bad_settings_are_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**change)


def test_a_directory_that_is_not_a_pipeline_or_a_reward_that_is_not_numbers_fails_readably(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"no model_index\.json"):
        train(_config(pipeline=str(tmp_path)), PROMPTS, brightness, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="NaN"):
        train(_config(), PROMPTS, lambda p, i: [float("nan")] * len(i), output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="3 values for 4 images"):
        train(_config(), PROMPTS, lambda p, i: [0.0] * 3, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ddpo_learns_a_known_reward() -> None:
    """Brightness as the reward: the mean reward of the last iterations clearly beats the first.
    8x8 images keep the action small enough for 64 samples an iteration to show it in 30 iterations;
    the LoRA also covers the time-embedding projections, which shift whole channels (a random tiny
    UNet's attention alone barely moves an image's mean)."""
    import tempfile

    config = _config(
        iterations=30, prompts_per_iteration=4, images_per_prompt=16, train_batch_size=32, sample_steps=4,
        resolution=8, inner_epochs=2, learning_rate=1e-2, clip_range=0.2, guidance_scale=1.0, lora_rank=8,
        lora_alpha=16, lora_targets=["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv_out"],
    )  # fmt: skip
    result = train(config, PROMPTS, brightness, output_dir=tempfile.mkdtemp())
    rewards = [m.reward_mean for m in result.metrics]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 0.02, rewards
    assert all(m.first_ratio_error == 0.0 for m in result.metrics)  # on-policy at every iteration
