"""Diffusion GRPO on the tiny SD-like pipeline: on-policy before the first update, KL to the
reference exactly 0 before it (the adapter starts as a no-op) and positive after, group rewards
(pairwise win rates), refusals, checkpoints for plain diffusers, and a known reward that rises."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.training.ml.test_ddpo import PROMPTS, _pipeline_dir, brightness
from training.ml.configs import ConfigError
from training.ml.diffusion_grpo.config import DiffusionGRPOConfig
from training.ml.diffusion_grpo.trainer import group_advantages, group_win_rates, train


def _config(**kw: Any) -> DiffusionGRPOConfig:
    base: dict[str, Any] = {
        "pipeline": str(_pipeline_dir()),
        "iterations": 1,
        "prompts_per_iteration": 2,
        "group_size": 2,
        "sample_steps": 4,
        "train_batch_size": 2,
        "guidance_scale": 2.0,
    }
    base.update(kw)
    return DiffusionGRPOConfig.from_dict(base)


def test_group_win_rates_and_advantages() -> None:
    scores = np.array([0.0, 1.0, 3.0, 5.0, 5.0])
    groups = np.array([0, 0, 0, 1, 1])
    rates = group_win_rates(scores, groups)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert rates[0] == pytest.approx((sig(-1) + sig(-3)) / 2)
    assert rates[2] == pytest.approx((sig(3) + sig(2)) / 2)
    assert rates[3] == rates[4] == pytest.approx(0.5)
    adv, flat = group_advantages(scores, groups, clip=5.0)
    assert adv[3] == adv[4] == 0.0 and flat == 0.5  # the second group has no spread
    assert adv[:3].mean() == pytest.approx(0.0) and adv[:3].std() == pytest.approx(1.0)


def test_two_iterations_with_kl_are_on_policy_and_load_into_plain_diffusers(tmp_path: Path) -> None:
    # One batch an iteration: the first iteration is all before the first optimizer step.
    config = _config(iterations=2, beta=0.1, reward="pairwise", learning_rate=1e-2, train_batch_size=4)
    result = train(config, PROMPTS, brightness, output_dir=tmp_path)
    first, second = result.metrics
    assert first.first_ratio_error == 0.0 and second.first_ratio_error == 0.0
    # Before any update the adapter is a no-op: the policy is the reference; after one it is not.
    assert first.kl == 0.0
    assert second.kl > 0.0
    assert 0.0 < first.reward_mean < 1.0  # win rates
    pipe = StableDiffusionPipeline.from_pretrained(str(_pipeline_dir()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.checkpoints[-1]))
    image = pipe(
        "a red square", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape[-1] == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [({"group_size": 1}, "group_size"), ({"reward": "best"}, "reward must be"), ({"beta": -1.0}, "beta")],
)
def test_bad_settings_are_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**change)


def test_diffusion_grpo_learns_a_known_reward() -> None:
    """Brightness again (see test_ddpo.test_ddpo_learns_a_known_reward for the settings)."""
    config = _config(
        iterations=30, prompts_per_iteration=4, group_size=16, train_batch_size=32, sample_steps=4,
        resolution=8, inner_epochs=2, learning_rate=1e-2, clip_range=0.2, guidance_scale=1.0, lora_rank=8,
        lora_alpha=16, lora_targets=["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv_out"],
    )  # fmt: skip
    result = train(config, PROMPTS, brightness, output_dir=tempfile.mkdtemp())
    scores = [m.score_mean for m in result.metrics]
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.02, scores
