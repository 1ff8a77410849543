"""Diffusion-DPO's settings: every field documented, validated before any model is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.ml.configs import ConfigError, check_diffusion_common, config_from_dict


@dataclass
class DiffusionDPOConfig:
    """One offline run over judged pairs (prompt, winner image, loser image)."""

    pipeline: str = ""
    """Local directory of a diffusers text-to-image pipeline with a UNet (Stable Diffusion-like)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """Pairs per step."""
    beta: float = 5000.0
    """DPO's beta for diffusion (the paper's 5000 for SD 1.5; errors are per-element means)."""
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    resolution: int = 0
    """Images are resized to this side; 0 takes the model's."""
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> DiffusionDPOConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.pipeline), "pipeline: the local directory of a diffusers pipeline is required")
        need(1 <= self.steps <= 1_000_000, "steps must be 1..1000000")
        need(1 <= self.batch_size <= 4096, "batch_size must be 1..4096")
        need(0 < self.beta <= 1e6, "beta must be in (0, 1e6]")
        need(0 < self.learning_rate <= 1e-1, "learning_rate must be in (0, 0.1]")
        need(0 <= self.weight_decay <= 1.0, "weight_decay must be 0..1")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        check_diffusion_common(self)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionDPOConfig:
        """A validated config from JSON-like data: unknown keys and wrong types are refused, by name."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
