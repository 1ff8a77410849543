"""Config of encoder fine-tuning: an image tower or a sentence encoder plus a linear Bradley-Terry head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
# Linear layers LoRA can wrap, per encoder family. CLIP/SigLIP vision layers: ``self_attn.{q,k,v,out}_proj``
# and ``mlp.fc1/fc2``. BERT-family sentence encoders (MiniLM ...): ``attention.self.{query,key,value}`` and
# ``dense``, which names the three other linears of a layer (``attention.output.dense``,
# ``intermediate.dense``, ``output.dense``).
LORA_TARGETS = {
    "image": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "text": ("query", "key", "value", "dense"),
}
# ``lora_targets=None`` picks these: the attention projections for image towers (the usual LoRA setup for
# ViTs), every linear of a layer for sentence encoders (small models, where the MLP matters as much).
DEFAULT_LORA_TARGETS = {
    "image": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "text": ["query", "key", "value", "dense"],
}
TEXT_INPUTS = ("response", "joint")


@dataclass
class FinetuneConfig:
    """Fine-tune an encoder together with a linear Bradley-Terry head, end to end on the judged pairs.

    Image projects (CLIP/SigLIP): the reward is ``r = linear([x, x * prompt])`` (``[x]`` without prompts)
    where ``x`` is the L2-normalised image embedding of the tower being trained and ``prompt`` the normalised
    embedding of the sample's prompt by the frozen text tower (computed once).

    Text projects (BERT-family sentence encoders, e.g. the default MiniLM): the reward is ``r = linear(x)``
    where ``x`` is the L2-normalised mean-pooled embedding (over the attention mask, as sentence-transformers
    and ``rewards.ml.encoders`` do) of the response alone (``text_input="response"``) or of the prompt and
    the response encoded together as a tokenizer text pair (``text_input="joint"``, cross-encoder style).

    Pairs are scored with the same likelihood as ``bt`` (Davidson or Rao-Kupper ties, or plain
    Bradley-Terry). ``method="lora"`` freezes the encoder and trains peft LoRA adapters (saved as a plain
    peft adapter directory as well as merged into a copy of the encoder); ``method="last_layers"``
    (image towers only) unfreezes the last vision layers.

    A share ``val_fraction`` of the training pairs (never the held-out ones) is set aside as an inner
    validation split: training stops when its loss has not improved for ``patience`` evaluations, the best
    evaluation's weights are kept, and a temperature fitted on it calibrates the probabilities.
    """

    method: str = "lora"
    """``"lora"`` (default: few trainable parameters, hard to wreck the encoder with) or ``"last_layers"``
    (image towers only)."""
    train_layers: int = 2
    """``last_layers`` only: how many of the last vision transformer layers are unfrozen (at least 1, at most
    the encoder's layer count)."""
    lora_layers: int | None = None
    """``lora`` only: adapters go into the last this many transformer layers; None (default) = every layer,
    the usual LoRA setup (the adapters are cheap, and adapting early layers helps with low-level cues). Fewer
    layers also make the backward pass shorter (it stops at the first adapted layer)."""
    lora_rank: int = 8
    """Rank r of each adapter's update ``B @ A`` (A is r x in, B is out x r)."""
    lora_alpha: float = 16.0
    """The update is scaled by ``lora_alpha / lora_rank`` (peft's ``lora_alpha``), so changing the rank does
    not change the effective learning rate much."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (peft's ``lora_dropout``), in [0, 1)."""
    lora_targets: list[str] | None = None
    """Which linears of each chosen layer get an adapter. Image towers: ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, ``fc1``, ``fc2``; sentence encoders: ``query``, ``key``, ``value``, ``dense``. None
    (default): ``q_proj k_proj v_proj out_proj`` for images, ``query key value dense`` for text."""
    text_input: str = "response"
    """Text projects only: what the encoder reads for a sample. ``"response"`` (default, as for the heads,
    where it measured better on HH-RLHF): the sample's text alone. ``"joint"``: the prompt and the response together, as a tokenizer text pair
    (``[CLS] prompt [SEP] response [SEP]``), so attention can relate them; when the pair is longer than
    ``max_length`` the whole response is kept if it fits and the prompt loses its beginning (the end of a
    conversation is what the response answers). Ignored for image projects."""
    max_length: int = 128
    """Text projects only: tokens per encoded text, special tokens included (at most the encoder's own
    limit). 128 keeps a few thousand pairs to minutes on a laptop CPU; MiniLM was trained on 256."""
    epochs: int = 3
    """Passes over the training pairs (1..1000); raised when needed to reach ``min_steps``. Early stopping
    may end the run sooner."""
    min_steps: int = 0
    """At least this many optimiser steps (a small data set gets more epochs); 0 (default) = exactly
    ``epochs``."""
    batch_size: int = 16
    """Pairs per optimiser step (each step encodes the distinct samples of its pairs, at most 2x this)."""
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
    val_fraction: float = 0.1
    """Share of the training pairs (grouped by comparison when known) set aside as the inner validation
    split for early stopping and the temperature, in [0, 0.5). 0, or a split that would leave fewer than
    ``min_val_pairs`` pairs on either side, trains on every pair for the full run with temperature 1."""
    min_val_pairs: int = 32
    """The inner split is used only when it has at least this many pairs (and the rest too)."""
    patience: int = 2
    """Stop after this many evaluations of the inner split in a row without a lower loss (at least 1)."""
    eval_every_steps: int = 0
    """Evaluate the inner split every this many steps as well as at every epoch end; 0 = epoch ends only."""
    calibrate: bool = True
    """Fit a temperature T on the inner split (one parameter, minimising its negative log-likelihood) and
    divide the rewards by it, so probabilities are calibrated. T is folded into the saved head's output
    layer (the saved rewards are already ``r / T``) and recorded as ``extra["temperature"]``."""
    ties: str = "davidson"
    """Tie model: ``"davidson"``, ``"rao_kupper"`` or ``"none"`` (ties dropped), as in ``bt``."""
    both_bad: str = "drop"
    """"Both bad" judgments: ``"drop"`` (no pairwise preference) or ``"tie"`` (count as a tie), as in ``bt``."""
    use_prompt: bool = True
    """Image projects: condition the head on the prompt embedding ([x, x * prompt]) when the data has
    prompts. (Text projects put the prompt into the encoder's input instead: ``text_input="joint"``.)"""
    grad_checkpointing: bool = False
    """Recompute the transformer layers' activations in the backward pass (transformers activation
    checkpointing): much less memory for large towers and batches, about a third more compute."""
    device: str = "cuda"
    """``"cuda"``, ``"cuda:N"``, ``"cpu"`` or ``"mps"``; an unavailable device is an error, not a fallback."""
    dtype: str = "float32"
    """Compute dtype of the encoder's forward: ``"float32"``, or ``"bfloat16"`` / ``"float16"`` under
    autocast (parameters, optimiser state and the head stay float32; ``"float16"`` adds a gradient scaler).
    Evaluation, scoring and the saved encoder are float32."""
    seed: int = 0
    """Seeds torch (LoRA and head initialisation, dropout) and numpy (inner split, shuffling)."""
    num_threads: int | None = None
    """torch CPU threads during training; None leaves the process's setting alone."""
    log_every_steps: int = 10
    """Report progress at least every this many steps (and at least every 0.5 s, and at each epoch end)."""

    def validate(self) -> None:
        """Raise ``ConfigError(field, message)`` for the first out-of-range field.

        Limits that depend on the encoder (a layer count above the encoder's, targets of the other family,
        ``last_layers`` or ``max_length`` on a sentence encoder) are checked by the trainers once the encoder
        is known, with the same ``ConfigError``.
        """
        check_choice("method", self.method, METHODS)
        check_int("train_layers", self.train_layers, 1, 1000)
        if self.lora_layers is not None:
            check_int("lora_layers", self.lora_layers, 1, 1000)
        check_int("lora_rank", self.lora_rank, 1, 4096)
        check_float("lora_alpha", self.lora_alpha, lo=0.0, lo_inclusive=False, hi=1e6)
        check_float("lora_dropout", self.lora_dropout, lo=0.0, lo_inclusive=True, hi=1.0)
        if self.lora_targets is not None:
            if not isinstance(self.lora_targets, list) or not self.lora_targets:
                raise ConfigError(
                    "lora_targets", f"must be a non-empty list of names or null, got {self.lora_targets!r}"
                )
            known = LORA_TARGETS["image"] + LORA_TARGETS["text"]
            for name in self.lora_targets:
                check_choice("lora_targets", name, known)
            if len(set(self.lora_targets)) != len(self.lora_targets):
                raise ConfigError("lora_targets", f"names must not repeat, got {self.lora_targets!r}")
        check_choice("text_input", self.text_input, TEXT_INPUTS)
        check_int("max_length", self.max_length, 8, 8192)
        check_int("epochs", self.epochs, 1, 1000)
        check_int("min_steps", self.min_steps, 0, 10_000_000)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        check_float("lr", self.lr, lo=0.0, lo_inclusive=False, hi=10.0)
        check_float("head_lr", self.head_lr, lo=0.0, lo_inclusive=False, hi=10.0)
        check_float("weight_decay", self.weight_decay, lo=0.0, lo_inclusive=True, hi=10.0)
        check_float("max_grad_norm", self.max_grad_norm, lo=0.0, lo_inclusive=True, hi=1e6)
        check_float("val_fraction", self.val_fraction, lo=0.0, lo_inclusive=True, hi=0.5)
        check_int("min_val_pairs", self.min_val_pairs, 1, 1_000_000)
        check_int("patience", self.patience, 1, 1000)
        check_int("eval_every_steps", self.eval_every_steps, 0, 10_000_000)
        check_bool("calibrate", self.calibrate)
        check_pairwise(self)
        check_bool("use_prompt", self.use_prompt)
        check_bool("grad_checkpointing", self.grad_checkpointing)
        check_device("device", self.device)
        check_choice("dtype", self.dtype, DTYPES)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.num_threads is not None:
            check_int("num_threads", self.num_threads, 1, 1024)
        check_int("log_every_steps", self.log_every_steps, 1, 1_000_000)

    def resolved_lora_targets(self, modality: str) -> list[str]:
        """``lora_targets`` for an encoder of ``modality`` ("image" or "text"): the family default when
        None; a ``ConfigError`` naming the field when a name belongs to the other family."""
        if self.lora_targets is None:
            return list(DEFAULT_LORA_TARGETS[modality])
        allowed = LORA_TARGETS[modality]
        wrong = [name for name in self.lora_targets if name not in allowed]
        if wrong:
            raise ConfigError(
                "lora_targets",
                f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a linear of a {modality} "
                f"encoder's layers (use {', '.join(allowed)})",
            )
        return list(self.lora_targets)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Build and validate; unknown keys are a ConfigError naming them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
