"""The reward an online RL job optimises, made of parts that are logged separately:

    total = model - conservative_k * spread - artifact_weight * P(artifact)

- ``model``: the reward model's score (``rewards.ml.reward_fn.RewardFunction``);
- ``spread``: for an ensemble, the members' standard deviation, so the policy is not paid for
  outputs the members disagree on (the conservative ``mean - k * std`` reward; ``k = 0``: off);
- ``P(artifact)``: an artifact classifier's probability that the output is broken (optional).

The KL term is the trainer's (GRPO's ``kl``; DDPO and RLOO log their own) and is logged beside
these. ``PolicyReward`` is a plain callable ``(prompts, outputs) -> list[float]``, like the reward
function it wraps, so the diffusion trainers and TRL's ``reward_funcs`` take it as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.ml.reward_fn import RewardFunction


class PolicyReward:
    """``total = model - conservative_k * spread - artifact_weight * P(artifact)``; see the module
    docstring. ``drain()`` returns each part's mean over the outputs scored since the last call."""

    def __init__(
        self,
        reward: RewardFunction,
        *,
        conservative_k: float = 0.0,
        artifact: RewardFunction | None = None,
        artifact_weight: float = 1.0,
    ) -> None:
        if conservative_k < 0 or not math.isfinite(conservative_k):
            raise ValueError("conservative_k must be a finite number >= 0")
        if conservative_k > 0 and reward.kind != "ensemble":
            raise ValueError(f"conservative_k needs an ensemble reward model, not {reward.kind}")
        if artifact is not None and artifact.kind != "artifact":
            raise ValueError(f"the artifact penalty needs an artifact classifier, not {artifact.kind}")
        if artifact is not None and (artifact_weight <= 0 or not math.isfinite(artifact_weight)):
            raise ValueError("artifact_weight must be a finite number > 0")
        self.reward = reward
        self.conservative_k = float(conservative_k)
        self.artifact = artifact
        self.artifact_weight = float(artifact_weight)
        self.__name__ = reward.__name__  # TRL logs a reward function under its __name__
        self._sums: dict[str, float] = {}
        self._count = 0

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any] | None = None,
        *,
        outputs: Sequence[Any] | None = None,
        **_columns: Any,
    ) -> list[float]:
        texts, items = RewardFunction.inputs(prompts, completions, outputs)
        if not items:
            return []
        parts = self.parts(texts, items)
        n = len(items)
        for name, values in parts.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(np.sum(values))
        self._count += n
        return [float(v) for v in parts["total"]]

    def parts(self, prompts: Sequence[str], outputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Each part ``(N,)`` and their ``total`` for outputs under their prompts."""
        out = self.reward.score_output(prompts, outputs)
        model = np.asarray(out.reward, dtype=np.float64)
        parts: dict[str, np.ndarray] = {"model": model}
        total = model.copy()
        if self.conservative_k > 0:
            spread = np.asarray(out.uncertainty, dtype=np.float64)
            parts["spread"] = spread
            total -= self.conservative_k * spread
        if self.artifact is not None:
            prob = self.artifact.score_output(prompts, outputs).artifact_prob
            penalty = self.artifact_weight * np.asarray(prob, dtype=np.float64)
            parts["artifact_penalty"] = penalty
            total -= penalty
        parts["total"] = total
        return parts

    def drain(self) -> dict[str, float]:
        """``{"reward_parts/<part>": mean}`` over the outputs scored since the last call (empty when
        none were), then start again."""
        if not self._count:
            return {}
        means = {f"reward_parts/{k}": v / self._count for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


__all__ = ["PolicyReward"]
