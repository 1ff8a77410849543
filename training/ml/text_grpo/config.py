"""Text GRPO's settings (mapped onto ``trl.GRPOConfig``): every field documented."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.ml.configs import DTYPES, ConfigError, config_from_dict


@dataclass
class TextGRPOConfig:
    """One GRPO run of a causal language model on a list of prompts."""

    policy: str = ""
    """Local directory of a transformers causal LM (and its tokenizer)."""
    steps: int = 50
    """Optimizer steps (``max_steps``)."""
    prompts_per_step: int = 2
    """Distinct prompts per step; each gets ``num_generations`` completions."""
    num_generations: int = 8
    """Completions per prompt: the group whose rewards are standardised (GRPO's G)."""
    max_completion_length: int = 64
    """Tokens generated per completion."""
    temperature: float = 1.0
    """Sampling temperature of the completions."""
    learning_rate: float = 1e-5
    beta: float = 0.0
    """Weight of the KL term to the reference policy (TRL's ``beta``; 0 skips the reference model)."""
    epsilon: float = 0.2
    """PPO clip range of the token-level ratio."""
    lora_rank: int = 0
    """LoRA rank through peft (0: train every weight)."""
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    init_lora: str = ""
    """A peft LoRA adapter of this policy to start from (a previous round's, with the same
    ``lora_rank`` and ``lora_alpha``); training continues it, so the saved adapter is the whole
    adapter. Empty: a fresh adapter. TRL's KL reference (``beta`` > 0) is then the adapter as loaded."""
    checkpoint_every: int = 0
    """Save every N steps (0: only at the end)."""
    seed: int = 0
    device: str = "cpu"
    """``cpu`` or ``cuda``: set explicitly, never guessed."""
    dtype: str = "float32"

    def validate(self) -> TextGRPOConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.policy), "policy: the local directory of a causal language model is required")
        need(1 <= self.steps <= 1_000_000, "steps must be 1..1000000")
        need(1 <= self.prompts_per_step <= 4096, "prompts_per_step must be 1..4096")
        need(
            2 <= self.num_generations <= 256, "num_generations must be 2..256 (a group needs two to compare)"
        )
        need(1 <= self.max_completion_length <= 32768, "max_completion_length must be 1..32768")
        need(0 < self.temperature <= 10, "temperature must be in (0, 10]")
        need(0 < self.learning_rate <= 1e-2, "learning_rate must be in (0, 0.01]")
        need(0 <= self.beta <= 10, "beta must be 0..10")
        need(0 < self.epsilon <= 1, "epsilon must be in (0, 1]")
        need(0 <= self.lora_rank <= 256, "lora_rank must be 0..256")
        need(1 <= self.lora_alpha <= 1024, "lora_alpha must be 1..1024")
        need(not self.init_lora or self.lora_rank > 0, "init_lora: continuing an adapter needs lora_rank > 0")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")
        need(self.device in ("cpu", "cuda"), "device must be cpu or cuda")
        need(
            not (self.device == "cpu" and self.dtype == "float16"),
            "float16 needs a GPU: use float32 or bfloat16 on cpu",
        )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextGRPOConfig:
        """A validated config from JSON-like data: unknown keys and wrong types are refused, by name."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
