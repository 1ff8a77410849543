"""Flow GRPO on tiny flow-matching pipelines built from configs (an SD3-like MMDiT with two CLIP
towers and a T5; a Wan-like video transformer with Wan's VAE): the SDE step's density and its
limit, log-probabilities recomputed exactly, on-policy before the first update, KL to the
reference, video rewards on decoded frames, checkpoints that load into plain diffusers, resume."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, WanPipeline
from safetensors.torch import load_file

from simulate.tiny_models import tiny_sd3_pipeline, tiny_wan_pipeline
from tests.training.ml.test_ddpo import PROMPTS, brightness
from training.ml.configs import ConfigError
from training.ml.diffusion.flow import flow_sde_step, flow_step, load_flow_pipeline, sample_flow_with_logprob
from training.ml.flow_grpo.config import FlowGRPOConfig, VideoGRPOConfig
from training.ml.flow_grpo.trainer import FlowGRPOMetrics, train


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", seed=0)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe", seed=0)


def video_brightness(prompts: list[str], videos: list[Any]) -> list[float]:
    assert all(isinstance(v, list) and len(v) == 9 for v in videos)  # frames, as PIL images
    return [float(np.mean(brightness(prompts, v))) for v in videos]


def _config(pipeline: Path, **kw: Any) -> FlowGRPOConfig:
    base: dict[str, Any] = {
        "pipeline": str(pipeline),
        "iterations": 1,
        "prompts_per_iteration": 2,
        "group_size": 2,
        "sample_steps": 3,
        "train_batch_size": 4,
        "guidance_scale": 2.0,
    }
    base.update(kw)
    return FlowGRPOConfig.from_dict(base)


def test_the_sde_step_is_a_gaussian_that_tends_to_the_euler_step() -> None:
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    sigma, sigma_next = 0.6, 0.4
    prev, log_prob, mean, std = flow_sde_step(
        v, x, sigma, sigma_next, noise_level=0.7, sigma_cap=0.9, generator=gen, return_mean=True
    )
    g = 0.7 * math.sqrt(0.6 / 0.4)
    assert float(std) == pytest.approx(g * math.sqrt(0.2))
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-5)
    # Scoring the drawn step again gives the same density.
    _, again = flow_sde_step(v, x, sigma, sigma_next, noise_level=0.7, sigma_cap=0.9, prev_latents=prev)
    assert torch.equal(again, log_prob)
    # No noise: the step's mean is the Euler step x + (s' - s) v.
    *_, mean0, _ = flow_sde_step(v, x, sigma, sigma_next, noise_level=1e-6, sigma_cap=0.9, return_mean=True)
    assert torch.allclose(mean0, x + (sigma_next - sigma) * v, atol=1e-5)
    with pytest.raises(ValueError, match="decrease"):
        flow_sde_step(v, x, 0.4, 0.6, noise_level=0.7, sigma_cap=0.9)


@pytest.mark.parametrize("video", [False, True])
def test_recorded_log_probs_are_recomputed_exactly(video: bool, sd3_dir: Path, wan_dir: Path) -> None:
    pipe = load_flow_pipeline(str(wan_dir if video else sd3_dir), device="cpu", dtype="float32")
    frames = 9 if video else 1
    rollout = sample_flow_with_logprob(
        pipe, ["a red cat", "the sea"], steps=4, guidance_scale=3.0, noise_level=0.7, height=16, width=16,
        frames=frames, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert rollout.log_probs.shape == (2, 4)
    assert rollout.outputs.shape == ((2, 9, 3, 16, 16) if video else (2, 3, 16, 16))
    for i in range(4):
        _, lp = flow_step(
            pipe, rollout.latents[:, i], i, rollout.timesteps, rollout.sigmas, rollout.cond,
            guidance_scale=3.0, noise_level=0.7, prev_latents=rollout.latents[:, i + 1],
        )  # fmt: skip
        assert torch.equal(lp, rollout.log_probs[:, i])


def _lora(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "pytorch_lora_weights.safetensors"))


def test_sd3_two_iterations_on_policy_with_kl_and_a_checkpoint_for_plain_diffusers(
    sd3_dir: Path, tmp_path: Path
) -> None:
    config = _config(
        sd3_dir, iterations=2, beta=0.1, reward="pairwise", learning_rate=1e-2, checkpoint_every=1,
        eval_every=2, eval_steps=4,
    )  # fmt: skip
    result = train(config, PROMPTS, brightness, output_dir=tmp_path)
    first, second = result.metrics
    assert isinstance(first, FlowGRPOMetrics) and isinstance(second, FlowGRPOMetrics)
    assert first.first_ratio_error == 0.0 and second.first_ratio_error == 0.0
    assert first.kl == 0.0 and second.kl > 0.0
    assert 0.0 < first.reward_mean < 1.0  # win rates
    assert first.eval_score is None and second.eval_score is not None and 0 <= second.eval_score <= 1
    assert "eval_score" in second.to_dict() and "eval_score" not in first.to_dict()
    one, two = (_lora(c) for c in result.checkpoints)
    assert set(one) == set(two) and all(k.startswith("transformer.") for k in one)
    assert any(not torch.equal(one[k], two[k]) for k in one)  # the optimizer moved the adapter
    saved = json.loads((result.checkpoints[-1] / "rewardloop_config.json").read_text())
    assert saved["noise_level"] == 0.7 and saved["sample_steps"] == 3

    def render(pipe: Any) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            "a red square",
            num_inference_steps=3,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        return np.asarray(out.images)

    base = render(StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True))
    tuned = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True)
    tuned.load_lora_weights(str(result.checkpoints[-1]))
    after = render(tuned)
    assert after.shape == base.shape == (1, 16, 16, 3)
    assert not np.array_equal(after, base)  # the adapter is loaded and does something


def test_resume_continues_the_run_as_if_never_stopped(sd3_dir: Path, tmp_path: Path) -> None:
    config = _config(sd3_dir, iterations=2, checkpoint_every=1, learning_rate=1e-2)
    straight = train(config, PROMPTS, brightness, output_dir=tmp_path / "a")
    resumed = train(
        config, PROMPTS, brightness, output_dir=tmp_path / "b", resume_from=straight.checkpoints[0]
    )
    assert [m.iteration for m in resumed.metrics] == [2]
    assert resumed.metrics[0].score_mean == pytest.approx(straight.metrics[1].score_mean, abs=1e-6)
    a, b = _lora(straight.checkpoints[-1]), _lora(resumed.checkpoints[-1])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_run_continues_a_previous_runs_adapter(sd3_dir: Path, tmp_path: Path) -> None:
    """``init_lora`` (the loop's next round): the run starts from the previous run's adapter; one
    of another rank, or a directory without one, is refused by name."""
    first = train(_config(sd3_dir, learning_rate=1e-2), PROMPTS, brightness, output_dir=tmp_path / "a")
    start = _lora(first.checkpoints[0])
    assert any(float(v.abs().max()) > 0 for k, v in start.items() if "lora_B" in k)
    cont = train(
        _config(sd3_dir, init_lora=str(first.checkpoints[0]), learning_rate=1e-7),
        PROMPTS, brightness, output_dir=tmp_path / "b",
    )  # fmt: skip
    weights = _lora(cont.checkpoints[0])
    assert weights.keys() == start.keys()
    assert all(torch.allclose(weights[k], start[k], atol=1e-5) for k in start)
    with pytest.raises(ValueError, match="do not fit this adapter"):
        train(
            _config(sd3_dir, init_lora=str(first.checkpoints[0]), lora_rank=8),
            PROMPTS, brightness, output_dir=tmp_path / "c",
        )  # fmt: skip
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        train(_config(sd3_dir, init_lora=str(tmp_path)), PROMPTS, brightness, output_dir=tmp_path / "d")


def test_video_grpo_rewards_decoded_frames_and_loads_into_a_plain_wan_pipeline(
    wan_dir: Path, tmp_path: Path
) -> None:
    config = VideoGRPOConfig.from_dict(
        {
            "pipeline": str(wan_dir), "iterations": 2, "prompts_per_iteration": 1, "group_size": 3,
            "sample_steps": 2, "train_batch_size": 3, "frames": 9, "resolution": 16, "learning_rate": 1e-2,
            "guidance_scale": 1.0,
        }
    )  # fmt: skip
    result = train(config, PROMPTS, video_brightness, output_dir=tmp_path)
    assert [m.first_ratio_error for m in result.metrics] == [0.0, 0.0]
    assert all(np.isfinite(m.loss) for m in result.metrics)
    pipe = WanPipeline.from_pretrained(str(wan_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.checkpoints[-1]))
    frames = pipe(
        "a red square", height=16, width=16, num_frames=9, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert np.asarray(frames).shape == (1, 9, 16, 16, 3)


@pytest.mark.parametrize(
    ("cls", "change", "message"),
    [
        (FlowGRPOConfig, {"noise_level": 0.0}, "noise_level"),
        (FlowGRPOConfig, {"sample_steps": 1}, "sample_steps"),
        (FlowGRPOConfig, {"group_size": 1}, "group_size"),
        (VideoGRPOConfig, {"frames": 1}, "frames"),
        (VideoGRPOConfig, {"resolution": 0}, "resolution"),
    ],
)
def test_bad_settings_are_refused_by_name(cls: Any, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls.from_dict({"pipeline": "/x", **change})


def test_a_pipeline_of_the_wrong_kind_is_refused(sd3_dir: Path, wan_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text-to-image pipeline; frames=9"):
        train(VideoGRPOConfig.from_dict({"pipeline": str(sd3_dir), "frames": 9, "resolution": 16}), PROMPTS,
              brightness, output_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="text-to-video pipeline; frames=1"):
        train(_config(wan_dir, resolution=16), PROMPTS, brightness, output_dir=tmp_path)
