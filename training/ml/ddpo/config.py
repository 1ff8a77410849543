"""DDPO's settings: every field documented, validated before any model is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.ml.configs import ConfigError, check_diffusion_common, config_from_dict


@dataclass
class DDPOConfig:
    """One DDPO run. An iteration samples ``batch_size`` images (``prompts_per_iteration`` prompts x
    ``images_per_prompt``), scores them, then trains ``inner_epochs`` passes over them."""

    pipeline: str = ""
    """Local directory of a diffusers text-to-image pipeline with a UNet (Stable Diffusion-like)."""
    iterations: int = 10
    """Sampling + training rounds."""
    prompts_per_iteration: int = 4
    """Distinct prompts sampled per iteration (drawn from the prompt list, with replacement)."""
    images_per_prompt: int = 4
    """Images per prompt; the advantage is normalised among a prompt's images when ``per_prompt_advantage``."""
    sample_steps: int = 20
    """DDIM steps when sampling (and so the number of log-probabilities recorded per image)."""
    eta: float = 1.0
    """DDIM eta: the step's noise scale (> 0, or the step has no log-probability)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance (1.0: none, half the UNet work)."""
    resolution: int = 0
    """Image side in pixels; 0 takes the UNet's ``sample_size`` times the VAE's scale."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (a random subset per sample), as DDPO's ``timestep_fraction``."""
    inner_epochs: int = 1
    """Passes over an iteration's samples."""
    train_batch_size: int = 4
    """Samples per gradient step (accumulated over the trained timesteps)."""
    learning_rate: float = 3e-4
    """AdamW learning rate for the LoRA weights."""
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    """PPO clip range of the importance ratio (per-element mean log-probs, so it is small)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    per_prompt_advantage: bool = True
    """Normalise rewards among each prompt's images (else over the whole batch)."""
    lora_rank: int = 4
    lora_alpha: int = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet modules that get LoRA adapters (attention projections)."""
    init_lora: str = ""
    """A LoRA checkpoint of this pipeline to start from (a previous round's, with the same
    ``lora_rank``, ``lora_alpha`` and ``lora_targets``); training continues it, so every checkpoint
    holds the whole adapter. Empty: a fresh adapter."""
    checkpoint_every: int = 0
    """Save a LoRA checkpoint every N iterations (0: only at the end)."""
    seed: int = 0
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``: set explicitly, never guessed."""
    dtype: str = "float32"
    """Precision of the frozen weights and of the UNet's forward pass: float32, bfloat16 or float16 (GPU)."""

    @property
    def batch_size(self) -> int:
        return self.prompts_per_iteration * self.images_per_prompt

    def validate(self) -> DDPOConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.pipeline), "pipeline: the local directory of a diffusers pipeline is required")
        need(1 <= self.iterations <= 100_000, "iterations must be 1..100000")
        need(1 <= self.prompts_per_iteration <= 4096, "prompts_per_iteration must be 1..4096")
        need(1 <= self.images_per_prompt <= 256, "images_per_prompt must be 1..256")
        need(1 <= self.sample_steps <= 1000, "sample_steps must be 1..1000")
        need(0 < self.eta <= 1.0, "eta must be in (0, 1]: a deterministic step (0) has no log-probability")
        need(1.0 <= self.guidance_scale <= 50.0, "guidance_scale must be 1..50")
        need(0 < self.timestep_fraction <= 1.0, "timestep_fraction must be in (0, 1]")
        need(1 <= self.inner_epochs <= 100, "inner_epochs must be 1..100")
        need(1 <= self.train_batch_size <= 4096, "train_batch_size must be 1..4096")
        need(0 < self.learning_rate <= 1e-1, "learning_rate must be in (0, 0.1]")
        need(0 <= self.weight_decay <= 1.0, "weight_decay must be 0..1")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        need(0 < self.clip_range <= 1.0, "clip_range must be in (0, 1]")
        need(self.adv_clip_max > 0, "adv_clip_max must be > 0")
        check_diffusion_common(self)
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DDPOConfig:
        """A validated config from JSON-like data: unknown keys and wrong types are refused, by name."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
