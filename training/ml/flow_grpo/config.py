"""Flow GRPO's settings (image and video): every field documented, validated before any model is
loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.ml.configs import check_diffusion_common, config_from_dict, require

REWARDS = ("score", "pairwise")


@dataclass
class FlowGRPOConfig:
    """One run. An iteration samples ``prompts_per_iteration`` prompts x ``group_size`` outputs."""

    pipeline: str = ""
    """Local directory of a diffusers flow-matching pipeline (SD3-like, or Wan-like for video)."""
    iterations: int = 10
    prompts_per_iteration: int = 4
    group_size: int = 8
    """G: outputs per prompt, the group whose rewards are standardised."""
    reward: str = "score"
    """``score``: the reward function's value; ``pairwise``: each output's Bradley-Terry win rate
    against the rest of its group (Pref-GRPO), mean_j sigmoid(s_i - s_j)."""
    sample_steps: int = 10
    """SDE steps of the training rollouts. Flow-GRPO samples with fewer steps than it evaluates
    with (``eval_steps``); both use the same shifted schedule."""
    eval_steps: int = 40
    """Steps of the plain pipeline (the ODE Euler sampler) for the evaluation."""
    eval_every: int = 0
    """Every this many iterations (and after the last), render the first ``prompts_per_iteration``
    prompts with the plain pipeline at ``eval_steps``, fixed seeds, and log ``eval_score``; 0: never."""
    train_fraction: float = 1.0
    """Fraction of the rollout's steps trained on."""
    noise_level: float = 0.7
    """a in the SDE step's noise scale g = a * sqrt(s / (1 - s)); 0 would be the (density-free)
    Euler step."""
    guidance_scale: float = 4.5
    resolution: int = 0
    """Output side in pixels; 0 takes the model's (image pipelines only)."""
    frames: int = 1
    """Frames per video (video pipelines: 4k + 1 for Wan's VAE); 1 for images."""
    inner_epochs: int = 1
    train_batch_size: int = 4
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    """Clip range of the importance ratio (per-element mean log-probs)."""
    beta: float = 0.0
    """Weight of the KL to the reference policy (the transformer with its adapter disabled)."""
    adv_clip_max: float = 5.0
    lora_rank: int = 4
    lora_alpha: int = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init_lora: str = ""
    """A LoRA checkpoint of this pipeline to start from (a previous round's, with the same
    ``lora_rank``, ``lora_alpha`` and ``lora_targets``); training continues it, so every checkpoint
    holds the whole adapter. Empty: a fresh adapter. The KL reference stays the base model."""
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def batch_size(self) -> int:
        return self.prompts_per_iteration * self.group_size

    def validate(self) -> FlowGRPOConfig:
        need = require
        need(bool(self.pipeline), "pipeline: the local directory of a diffusers pipeline is required")
        need(1 <= self.iterations <= 100_000, "iterations must be 1..100000")
        need(1 <= self.prompts_per_iteration <= 4096, "prompts_per_iteration must be 1..4096")
        need(2 <= self.group_size <= 256, "group_size must be 2..256 (a group needs two to compare)")
        need(self.reward in REWARDS, f"reward must be one of {', '.join(REWARDS)}")
        need(2 <= self.sample_steps <= 1000, "sample_steps must be 2..1000")
        need(1 <= self.eval_steps <= 1000, "eval_steps must be 1..1000")
        need(self.eval_every >= 0, "eval_every must be >= 0")
        need(0 < self.train_fraction <= 1.0, "train_fraction must be in (0, 1]")
        need(
            0 < self.noise_level <= 2.0,
            "noise_level must be in (0, 2]: the Euler step without noise (0) has no log-probability",
        )
        need(1.0 <= self.guidance_scale <= 50.0, "guidance_scale must be 1..50")
        need(1 <= self.frames <= 257, "frames must be 1..257")
        need(1 <= self.inner_epochs <= 100, "inner_epochs must be 1..100")
        need(1 <= self.train_batch_size <= 4096, "train_batch_size must be 1..4096")
        need(0 < self.learning_rate <= 1e-1, "learning_rate must be in (0, 0.1]")
        need(0 <= self.weight_decay <= 1.0, "weight_decay must be 0..1")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        need(0 < self.clip_range <= 1.0, "clip_range must be in (0, 1]")
        need(0 <= self.beta <= 100, "beta must be 0..100")
        need(self.adv_clip_max > 0, "adv_clip_max must be > 0")
        check_diffusion_common(self)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowGRPOConfig:
        """A validated config from JSON-like data: unknown keys and wrong types are refused, by name."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VideoGRPOConfig(FlowGRPOConfig):
    """Flow GRPO on a text-to-video pipeline: the same trainer, with frames and a side required."""

    frames: int = 33
    """Frames per video; Wan's VAE takes 4k + 1."""
    resolution: int = 256
    """Video side in pixels (square), a multiple of the VAE's spatial factor."""
    group_size: int = 4
    prompts_per_iteration: int = 2
    train_batch_size: int = 2

    def validate(self) -> VideoGRPOConfig:
        super().validate()
        require(self.frames >= 2, "frames must be >= 2 for a video (4k + 1 for Wan's VAE)")
        require(self.resolution > 0, "resolution must be set for a video pipeline")
        return self
