"""Name -> config class / train function / model class, for every reward-model kind (plain dicts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rewards.ml.artifact.config import ArtifactConfig
from rewards.ml.artifact.trainer import train as train_artifact
from rewards.ml.aspects.config import AspectsConfig
from rewards.ml.aspects.trainer import train as train_aspects
from rewards.ml.bt.config import BTConfig
from rewards.ml.bt.trainer import train as train_bt
from rewards.ml.ensemble.config import EnsembleConfig
from rewards.ml.ensemble.trainer import train as train_ensemble
from rewards.ml.model import KINDS, RewardModel, load_reward_model

CONFIGS: dict[str, type[Any]] = {
    "bt": BTConfig,
    "aspects": AspectsConfig,
    "ensemble": EnsembleConfig,
    "artifact": ArtifactConfig,
}

# Each: train(config, train_pairs, *, holdout=None, progress=None) -> RewardModel
TRAINERS: dict[str, Callable[..., RewardModel]] = {
    "bt": train_bt,
    "aspects": train_aspects,
    "ensemble": train_ensemble,
    "artifact": train_artifact,
}

__all__ = ["CONFIGS", "KINDS", "TRAINERS", "load_reward_model"]
