"""The RL trainers with our own reward model, as the loop runs them: a Bradley-Terry head trained
on a tiny random CLIP's features of judged pairs (the brighter image wins), saved as a version
directory, loaded with ``RewardFunction.from_pretrained`` (no database) and passed to DDPO as its
reward function."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
from PIL import Image

from rewards.ml.bt.config import BTConfig
from rewards.ml.bt.trainer import train as train_head
from rewards.ml.data import A_WINS, PairSet
from rewards.ml.encoders import load_encoder
from rewards.ml.reward_fn import RewardFunction, bundle_encoder
from tests.rewards.ml.tiny_models import save_tiny_clip
from tests.training.ml.test_ddpo import PROMPTS, _config
from training.ml.ddpo.trainer import train as ddpo


def _grey(level: int) -> Image.Image:
    return Image.fromarray(np.full((32, 32, 3), level, dtype=np.uint8))


def _brightness_reward(tmp_path: Path) -> RewardFunction:
    clip = save_tiny_clip(tmp_path / "clip")
    encoder = load_encoder(clip)
    levels = list(range(0, 256, 8))
    x = encoder.embed_images([_grey(v) for v in levels]).astype(np.float32)
    rng = np.random.default_rng(0)
    a, b = [], []
    for _ in range(600):
        i, j = rng.choice(len(levels), 2, replace=False)
        winner, loser = (i, j) if levels[i] > levels[j] else (j, i)
        a.append(winner)
        b.append(loser)
    pairs = PairSet(
        x=x[:, None, :],
        mask=np.ones((len(levels), 1), dtype=bool),
        prompt=None,
        a=np.array(a),
        b=np.array(b),
        outcome=np.full(len(a), A_WINS, dtype=np.int8),
        weight=np.ones(len(a), dtype=np.float32),
    )
    head = train_head(BTConfig.from_dict({"epochs": 200}), pairs)
    version = tmp_path / "version"
    head.save_pretrained(version)
    bundle_encoder(version, clip)
    return RewardFunction.from_pretrained(version)


def test_ddpo_runs_on_a_reward_model_loaded_from_its_version_directory(tmp_path: Path) -> None:
    reward = _brightness_reward(tmp_path)
    scores = reward(["x"] * 3, [_grey(20), _grey(128), _grey(240)])
    assert scores[0] < scores[1] < scores[2]  # the head learned what the judges preferred
    result = ddpo(_config(), PROMPTS, reward, output_dir=tmp_path / "run")
    (m,) = result.metrics
    assert m.first_ratio_error == 0.0 and np.isfinite(m.reward_mean)
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
