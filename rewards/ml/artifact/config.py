"""Config of the artifact classifier."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rewards.ml.progress import check_common, config_from_dict


@dataclass
class ArtifactConfig:
    """A per-sample binary classifier of ``PairSet.artifact`` labels (1 flagged, 0 clean, -1 ignored) with
    class-balanced BCE (each class carries half the loss, however rare flags are). It outputs the artifact
    probability; its reward is minus the artifact logit (higher = cleaner). Pairs are not used.

    The defaults train on 100k labelled samples of 512-d features in a few seconds on 2 CPU cores.
    """

    epochs: int = 4
    """Passes over the labelled samples (1..1000); raised when needed to reach ``min_steps``."""
    min_steps: int = 300
    """At least this many optimiser steps: a small data set gets more epochs than ``epochs`` (2,000 samples
    at batch 1024 would otherwise be 8 steps). 0 = exactly ``epochs``."""
    batch_size: int = 1024
    """Samples per optimiser step."""
    lr: float = 3e-3
    """Peak AdamW learning rate; a 2% linear warm-up, then cosine decay to 0."""
    weight_decay: float = 1e-2
    """AdamW weight decay on the scorer's weight matrices (not on biases)."""
    hidden: int = 0
    """Width of the scorer's hidden layers; 0 (default) makes the head linear in [x, x * prompt], which on
    CLIP-like features learns as well as an MLP and overfits less (measured: 100k pairs, 10% label noise)."""
    hidden_layers: int = 1
    """Number of hidden layers (GELU); ignored when ``hidden`` is 0."""
    dropout: float = 0.0
    """Dropout after each hidden layer, in [0, 1)."""
    pooling: str = "mean"
    """How the K vectors of a sample (video frames) are pooled: ``"mean"`` over real vectors, or
    ``"attention"`` (a learned query, softmax over real frames). Irrelevant for K=1."""
    use_prompt: bool = False
    """Condition on the prompt embedding ([x, x * prompt]) when the data has prompts. Off by default: an
    artifact (broken hands, flicker) is a property of the sample, whatever was asked for."""
    seed: int = 0
    """Seeds torch (initialisation, dropout) and numpy (shuffling)."""
    device: str = "cpu"
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; an unavailable device is an error, not a fallback."""
    dtype: str = "float32"
    """Parameter and feature dtype: ``"float32"`` or ``"float64"``."""
    num_threads: int | None = None
    """torch CPU threads during training; None leaves the process's setting alone."""
    log_every_steps: int = 50
    """Report progress at least every this many steps (and at least every 0.5 s, and at each epoch end)."""

    def validate(self) -> None:
        """Raise ``ConfigError(field, message)`` for the first out-of-range field."""
        check_common(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactConfig:
        """Build and validate; unknown keys are a ConfigError naming them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
