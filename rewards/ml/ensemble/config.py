"""Config of the ensemble reward model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rewards.ml.progress import (
    check_common,
    check_int,
    check_pairwise,
    check_regularisation,
    config_from_dict,
)


@dataclass
class EnsembleConfig:
    """``n_members`` Bradley-Terry heads, each trained on its own bootstrap resample of the pairs (drawn
    with a per-member seed, applied as per-pair counts) and from its own initialisation. Reward = member
    mean, uncertainty = member std; ``conservative_reward`` = mean - k * std for RL. The members are one
    stacked module trained in one loop, so 5 members cost far less than 5 runs.

    Ties: ``ties`` picks the tie model (Davidson or Rao-Kupper, each with one learned tie parameter), or
    ``"none"`` to drop ties and train plain Bradley-Terry.

    Both-bad: ``both_bad="drop"`` (default) ignores "both bad" judgments, because they say both samples are
    below a bar, not that they are equal, so they carry no pairwise preference; ``"tie"`` counts them as ties
    (needs a tie model).

    The defaults train a head on 100k pairs of 512-d features in a few seconds on 2 CPU cores.
    """

    epochs: int = 4
    """Passes over the training pairs (1..1000); raised when needed to reach ``min_steps``."""
    min_steps: int = 300
    """At least this many optimiser steps: a small data set gets more epochs than ``epochs`` (2,000 pairs
    at batch 1024 would otherwise be 8 steps). 0 = exactly ``epochs``."""
    batch_size: int = 1024
    """Pairs per optimiser step."""
    lr: float = 3e-3
    """Peak AdamW learning rate; a 2% linear warm-up, then cosine decay to 0."""
    weight_decay: float = 1e-2
    """AdamW weight decay on the scorer's weight matrices (not on biases or tie parameters). Decoupled from
    the loss, so it barely regularises a linear head; ``l2`` is the penalty that does."""
    l2: float | None = None
    """L2 penalty ``l2 * sum(w ** 2)`` on the scorer's weight matrices, added to the mean pair loss: the
    objective of L2-regularised logistic regression (inputs are standardised, so one strength suits every
    feature). None (default) adapts it to the data: ``heads.AUTO_L2_PAIRS / n`` for n fitted pairs (1000 / n,
    measured on HH-RLHF), strong on a few thousand pairs and vanishing on millions; the saved config holds
    the value used. 0 turns it off (the behaviour before the inner split existed)."""
    val_fraction: float = 0.1
    """Share of the TRAINING pairs (whole comparisons, drawn with ``seed``) set aside as the inner validation
    split for early stopping and the temperature, in [0, 0.5); the job's held-out pairs are never used.
    0, or a split that would leave fewer than ``min_val_pairs`` pairs on either side, trains on every pair
    for the full run with temperature 1 (``heads.inner_split``)."""
    min_val_pairs: int = 32
    """The inner split is used only when it has at least this many pairs (and the rest too)."""
    patience: int = 30
    """Stop after this many epochs in a row without a lower inner-split loss; the best epoch's weights are
    kept either way. 0 = never stop early (still keeping the best epoch)."""
    calibrate: bool = True
    """Fit a temperature T on the inner split (one parameter, minimising its negative log-likelihood of the
    decisive outcomes) after training: every head output is divided by T, so probabilities (and ECE) are
    calibrated. Saved with the model (the ``temperature`` buffer) and applied by ``score`` and
    ``prob_first_wins``. Needs the inner split; without it T stays 1."""
    text_input: str = "response"
    """What the features of a text sample are: ``"joint"`` (default), the prompt and the response embedded
    TOGETHER by the sentence encoder as a text pair (``Encoder.embed_text_pairs``, cross-encoder style, the
    end of the prompt kept), or ``"response"``, the response alone. Read by the service that loads the
    features (the embedding cache keeps both forms apart) and by ``RewardFunction``; image and video
    samples, and encoders other than sentence encoders, always use ``"response"``. Measured on HH-RLHF
    (bench/reward_quality.py, docs/BENCHMARKS.md): with the data-size L2, the response alone
    beat the joint form there, so ``response`` is the default; ``joint`` is one field away."""
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
    use_prompt: bool = True
    """Condition on the prompt embedding ([x, x * prompt], PickScore-like) when the data has prompts."""
    ties: str = "davidson"
    """Tie model: ``"davidson"``, ``"rao_kupper"`` or ``"none"`` (ties dropped)."""
    both_bad: str = "drop"
    """"Both bad" judgments: ``"drop"`` (no pairwise preference) or ``"tie"`` (count as a tie)."""
    n_members: int = 5
    """Ensemble members (2..64)."""
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
        check_pairwise(self)
        check_regularisation(self)
        check_int("n_members", self.n_members, 2, 64)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleConfig:
        """Build and validate; unknown keys are a ConfigError naming them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
