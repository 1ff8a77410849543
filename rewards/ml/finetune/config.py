"""Config of encoder fine-tuning: the image tower plus a linear Bradley-Terry head, trained end to end."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rewards.ml.progress import (
    ConfigError,
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_int,
    check_pairwise,
    config_from_dict,
)

METHODS = ("last_layers", "lora")
# Mixed precision: parameters stay float32, the encoder's forward runs under autocast in this dtype.
DTYPES = ("float32", "bfloat16", "float16")
# Linear layers of a CLIP/SigLIP vision transformer layer that LoRA can wrap (``self_attn.*`` and ``mlp.*``).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class FinetuneConfig:
    """Fine-tune the image tower of a CLIP/SigLIP encoder together with a linear Bradley-Terry head.

    The reward is ``r = linear([x, x * prompt])`` (``[x]`` without prompts) where ``x`` is the L2-normalised
    image embedding of the tower being trained and ``prompt`` the normalised embedding of the sample's prompt
    by the frozen text tower (computed once). Pairs are scored with the same likelihood as ``bt`` (Davidson
    or Rao-Kupper ties, or plain Bradley-Terry).

    ``method="last_layers"`` unfreezes the last ``train_layers`` vision layers and everything after them
    (the post-layernorm, CLIP's visual projection, SigLIP's pooling head). ``method="lora"`` freezes the whole
    encoder and adds low-rank adapters to the ``lora_targets`` linears of the last ``lora_layers`` vision
    layers (all of them by default); they are merged into the weights on save, so the saved encoder is a
    plain transformers model either way. The text tower is never trained.
    """

    method: str = "lora"
    """``"lora"`` (default: few trainable parameters, hard to wreck the encoder with) or ``"last_layers"``."""
    train_layers: int = 2
    """``last_layers`` only: how many of the last vision transformer layers are unfrozen (at least 1, at most
    the encoder's layer count)."""
    lora_layers: int | None = None
    """``lora`` only: adapters go into the last this many vision layers; None (default) = every vision layer,
    the usual LoRA setup (the adapters are cheap, and adapting early layers helps with low-level cues)."""
    lora_rank: int = 8
    """Rank r of each adapter's update ``B @ A`` (A is r x in, B is out x r)."""
    lora_alpha: float = 16.0
    """The update is scaled by ``lora_alpha / lora_rank`` (as in peft), so changing the rank does not change
    the effective learning rate much."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Which linears of each chosen vision layer get an adapter: the attention projections ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj`` (default) and/or the MLP's ``fc1``, ``fc2``."""
    epochs: int = 3
    """Passes over the training pairs (1..1000); raised when needed to reach ``min_steps``."""
    min_steps: int = 0
    """At least this many optimiser steps (a small data set gets more epochs); 0 (default) = exactly
    ``epochs``."""
    batch_size: int = 16
    """Pairs per optimiser step (each step embeds the distinct images of its pairs, at most 2x this)."""
    lr: float = 1e-4
    """Peak AdamW learning rate of the encoder parameters (LoRA adapters or unfrozen layers); a 2% linear
    warm-up, then cosine decay to 0, as in ``bt``."""
    head_lr: float = 1e-3
    """Peak AdamW learning rate of the head (same schedule): it starts from scratch, the encoder does not."""
    weight_decay: float = 1e-2
    """AdamW weight decay on the trained encoder parameters and the head's weight matrices (not on the
    head's bias or tie parameter)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping): one bad batch should not undo a pretrained
    encoder."""
    ties: str = "davidson"
    """Tie model: ``"davidson"``, ``"rao_kupper"`` or ``"none"`` (ties dropped), as in ``bt``."""
    both_bad: str = "drop"
    """"Both bad" judgments: ``"drop"`` (no pairwise preference) or ``"tie"`` (count as a tie), as in ``bt``."""
    use_prompt: bool = True
    """Condition the head on the prompt embedding ([x, x * prompt]) when the data has prompts."""
    grad_checkpointing: bool = False
    """Recompute the vision layers' activations in the backward pass (transformers activation
    checkpointing): much less memory for large towers and batches, about a third more compute."""
    device: str = "cuda"
    """``"cuda"``, ``"cuda:N"``, ``"cpu"`` or ``"mps"``; an unavailable device is an error, not a fallback."""
    dtype: str = "float32"
    """Compute dtype of the encoder's forward: ``"float32"``, or ``"bfloat16"`` / ``"float16"`` under
    autocast (parameters, optimiser state and the head stay float32; ``"float16"`` adds a gradient scaler).
    Evaluation, scoring and the saved encoder are float32."""
    seed: int = 0
    """Seeds torch (LoRA and head initialisation) and numpy (shuffling)."""
    num_threads: int | None = None
    """torch CPU threads during training; None leaves the process's setting alone."""
    log_every_steps: int = 10
    """Report progress at least every this many steps (and at least every 0.5 s, and at each epoch end)."""

    def validate(self) -> None:
        """Raise ``ConfigError(field, message)`` for the first out-of-range field.

        Limits that depend on the encoder (``train_layers`` / ``lora_layers`` above its layer count) are
        checked by ``train`` once the encoder is loaded, with the same ``ConfigError``.
        """
        check_choice("method", self.method, METHODS)
        check_int("train_layers", self.train_layers, 1, 1000)
        if self.lora_layers is not None:
            check_int("lora_layers", self.lora_layers, 1, 1000)
        check_int("lora_rank", self.lora_rank, 1, 4096)
        check_float("lora_alpha", self.lora_alpha, lo=0.0, lo_inclusive=False, hi=1e6)
        if not isinstance(self.lora_targets, list) or not self.lora_targets:
            raise ConfigError("lora_targets", f"must be a non-empty list of names, got {self.lora_targets!r}")
        for name in self.lora_targets:
            check_choice("lora_targets", name, LORA_TARGETS)
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise ConfigError("lora_targets", f"names must not repeat, got {self.lora_targets!r}")
        check_int("epochs", self.epochs, 1, 1000)
        check_int("min_steps", self.min_steps, 0, 10_000_000)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        check_float("lr", self.lr, lo=0.0, lo_inclusive=False, hi=10.0)
        check_float("head_lr", self.head_lr, lo=0.0, lo_inclusive=False, hi=10.0)
        check_float("weight_decay", self.weight_decay, lo=0.0, lo_inclusive=True, hi=10.0)
        check_float("max_grad_norm", self.max_grad_norm, lo=0.0, lo_inclusive=True, hi=1e6)
        check_pairwise(self)
        check_bool("use_prompt", self.use_prompt)
        check_bool("grad_checkpointing", self.grad_checkpointing)
        check_device("device", self.device)
        check_choice("dtype", self.dtype, DTYPES)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, 1, 1024)
        check_int("log_every_steps", self.log_every_steps, 1, 1_000_000)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Build and validate; unknown keys are a ConfigError naming them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
