"""Text RLOO's settings: the same fields as text GRPO (TRL's RLOOConfig shares them), with the
group of ``num_generations`` completions as the leave-one-out baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.ml.configs import config_from_dict
from training.ml.text_grpo.config import TextGRPOConfig


@dataclass
class TextRLOOConfig(TextGRPOConfig):
    """One RLOO run of a causal language model on a list of prompts (fields: ``TextGRPOConfig``)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextRLOOConfig:
        return config_from_dict(cls, data)
