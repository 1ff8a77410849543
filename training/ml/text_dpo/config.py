"""Text DPO's settings (mapped onto ``trl.DPOConfig``): every field documented."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.ml.configs import DTYPES, ConfigError, config_from_dict


@dataclass
class TextDPOConfig:
    """One offline DPO run of a causal language model on judged pairs (prompt, chosen, rejected)."""

    policy: str = ""
    """Local directory of a transformers causal LM (and its tokenizer)."""
    steps: int = 50
    """Optimizer steps (``max_steps``); the pairs are cycled through as often as that takes."""
    batch_size: int = 8
    """Pairs per step."""
    beta: float = 0.1
    """DPO's beta: how far the policy may move from the reference (the policy before training)."""
    learning_rate: float = 5e-6
    max_length: int = 512
    """Tokens of prompt + response kept per example (longer ones lose their end, as TRL does)."""
    lora_rank: int = 0
    """LoRA rank through peft (0: train every weight; the reference is then a frozen copy)."""
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    checkpoint_every: int = 0
    """Save every N steps (0: only at the end)."""
    seed: int = 0
    device: str = "cpu"
    """``cpu`` or ``cuda``: set explicitly, never guessed."""
    dtype: str = "float32"

    def validate(self) -> TextDPOConfig:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.policy), "policy: the local directory of a causal language model is required")
        need(1 <= self.steps <= 1_000_000, "steps must be 1..1000000")
        need(1 <= self.batch_size <= 4096, "batch_size must be 1..4096")
        need(0 < self.beta <= 100, "beta must be in (0, 100]")
        need(0 < self.learning_rate <= 1e-2, "learning_rate must be in (0, 0.01]")
        need(8 <= self.max_length <= 131072, "max_length must be 8..131072")
        need(0 <= self.lora_rank <= 256, "lora_rank must be 0..256")
        need(1 <= self.lora_alpha <= 1024, "lora_alpha must be 1..1024")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")
        need(self.device in ("cpu", "cuda"), "device must be cpu or cuda")
        need(
            not (self.device == "cpu" and self.dtype == "float16"),
            "float16 needs a GPU: use float32 or bfloat16 on cpu",
        )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextDPOConfig:
        """A validated config from JSON-like data: unknown keys and wrong types are refused, by name."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
