"""The reward online RL optimises (``training.ml.reward.PolicyReward``): an ensemble's conservative
``mean - k * std`` and an artifact classifier's penalty, each part logged separately, on real heads
trained on a tiny random CLIP's features and loaded from version directories (no database)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from typing import Any

import numpy as np
import pytest
from PIL import Image

from rewards.ml.artifact.config import ArtifactConfig
from rewards.ml.artifact.trainer import train as train_artifact
from rewards.ml.bt.config import BTConfig
from rewards.ml.bt.trainer import train as train_bt
from rewards.ml.data import A_WINS, PairSet
from rewards.ml.encoders import load_encoder
from rewards.ml.ensemble.config import EnsembleConfig
from rewards.ml.ensemble.trainer import train as train_ensemble
from rewards.ml.reward_fn import RewardFunction, bundle_encoder
from tests.rewards.ml.tiny_models import save_tiny_clip
from training.ml.reward import PolicyReward

LEVELS = list(range(0, 256, 8))


def _grey(level: int) -> Image.Image:
    return Image.fromarray(np.full((32, 32, 3), level, dtype=np.uint8))


@pytest.fixture(scope="module")
def versions(tmp_path_factory: Any) -> dict[str, RewardFunction]:
    """ "Brighter wins" as a BT head and as a 4-member ensemble; "dark images are broken" as an
    artifact classifier; all three saved and loaded back as version directories."""
    root = tmp_path_factory.mktemp("policy-reward")
    clip = save_tiny_clip(root / "clip")
    x = load_encoder(clip).embed_images([_grey(v) for v in LEVELS]).astype(np.float32)
    rng = np.random.default_rng(0)
    a, b = [], []
    for _ in range(600):
        i, j = rng.choice(len(LEVELS), 2, replace=False)
        a.append(i if LEVELS[i] > LEVELS[j] else j)
        b.append(j if LEVELS[i] > LEVELS[j] else i)
    pairs = PairSet(
        x=x[:, None, :],
        mask=np.ones((len(LEVELS), 1), dtype=bool),
        prompt=None,
        a=np.array(a),
        b=np.array(b),
        outcome=np.full(len(a), A_WINS, dtype=np.int8),
        weight=np.ones(len(a), dtype=np.float32),
        artifact=np.array([1 if v < 64 else 0 for v in LEVELS], dtype=np.int8),
    )
    heads = {
        "bt": train_bt(BTConfig.from_dict({"epochs": 50}), pairs),
        "ensemble": train_ensemble(EnsembleConfig.from_dict({"epochs": 50, "n_members": 4}), pairs),
        "artifact": train_artifact(ArtifactConfig.from_dict({"epochs": 200}), pairs),
    }
    out = {}
    for name, head in heads.items():
        head.save_pretrained(root / name)
        bundle_encoder(root / name, clip)
        out[name] = RewardFunction.from_pretrained(root / name)
    return out


def test_conservative_reward_is_mean_minus_k_std_and_each_part_is_logged(
    versions: dict[str, RewardFunction],
) -> None:
    ensemble = versions["ensemble"]
    images = [_grey(v) for v in (16, 100, 200, 250)]
    prompts = ["p"] * len(images)
    out = ensemble.score_output(prompts, images)
    assert out.uncertainty is not None and float(out.uncertainty.min()) > 0.0  # members disagree a little
    reward = PolicyReward(ensemble, conservative_k=2.0)
    total = reward(prompts=prompts, completions=images)  # TRL's keywords
    np.testing.assert_allclose(total, out.reward - 2.0 * out.uncertainty, rtol=0, atol=1e-6)
    assert total == reward(prompts, outputs=images)  # our keyword; same scores
    parts = reward.drain()
    assert set(parts) == {"reward_parts/model", "reward_parts/spread", "reward_parts/total"}
    assert parts["reward_parts/model"] == pytest.approx(float(out.reward.mean()), abs=1e-6)
    assert parts["reward_parts/spread"] == pytest.approx(float(out.uncertainty.mean()), abs=1e-6)
    assert parts["reward_parts/total"] == pytest.approx(float(np.mean(total)), abs=1e-6)
    assert reward.drain() == {}  # drained: the next step starts from nothing


def test_artifact_penalty_is_subtracted_with_its_weight(versions: dict[str, RewardFunction]) -> None:
    bt, artifact = versions["bt"], versions["artifact"]
    images = [_grey(8), _grey(200)]
    prompts = ["p", "p"]
    prob = artifact.score_output(prompts, images).artifact_prob
    assert prob is not None and prob[0] > 0.5 > prob[1]  # the dark one looks broken
    plain = bt(prompts, images)
    reward = PolicyReward(bt, artifact=artifact, artifact_weight=3.0)
    total = reward(prompts, images)
    np.testing.assert_allclose(total, np.array(plain) - 3.0 * prob, rtol=0, atol=1e-6)
    parts = reward.drain()
    assert parts["reward_parts/artifact_penalty"] == pytest.approx(float(3.0 * prob.mean()), abs=1e-6)
    assert "reward_parts/spread" not in parts  # a BT head has no spread, and k is 0
    assert PolicyReward(bt)(prompts, images) == plain  # no options: the reward model's score as it is


@pytest.mark.parametrize(
    ("main", "kwargs", "message"),
    [
        ("bt", {"conservative_k": 1.0}, "conservative_k needs an ensemble reward model, not bt"),
        ("ensemble", {"conservative_k": -1.0}, "conservative_k must be a finite number >= 0"),
        ("ensemble", {"conservative_k": float("nan")}, "conservative_k must be a finite number >= 0"),
        ("bt", {"artifact": "bt"}, "needs an artifact classifier, not bt"),
        (
            "bt",
            {"artifact": "artifact", "artifact_weight": 0.0},
            "artifact_weight must be a finite number > 0",
        ),
    ],
)
def test_refusals(
    versions: dict[str, RewardFunction], main: str, kwargs: dict[str, Any], message: str
) -> None:
    if "artifact" in kwargs:
        kwargs = {**kwargs, "artifact": versions[kwargs["artifact"]]}
    with pytest.raises(ValueError, match=message):
        PolicyReward(versions[main], **kwargs)
