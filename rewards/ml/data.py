"""The arrays every reward-model trainer reads.

Samples are embedded once by an encoder (``rewards.ml.encoders``); a ``PairSet`` holds those cached
features plus the judged pairs over them, so a head trains without any encoder pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Outcome codes of a pair, seen from sample ``a``.
A_WINS = 1
B_WINS = -1
TIE = 0
BOTH_BAD = 2
MISSING = 127  # an aspect nobody judged for this pair


@dataclass
class PairSet:
    """Cached features of S samples and P judged pairs over them.

    ``x`` is ``(S, K, D)`` float32: K vectors per sample (K=1 for an image or a text; K frames for a
    video, shorter videos padded and masked). ``mask`` is ``(S, K)`` bool, True where a vector is real.
    ``prompt`` is ``(S, D)`` float32, the prompt embedding of each sample's prompt (None when the model
    is not prompt-conditioned). Pairs index into the samples: ``a``/``b`` are ``(P,)`` int64,
    ``outcome`` is ``(P,)`` int8 with the codes above, ``weight`` is ``(P,)`` float32 (1.0 for one vote).
    ``aspects`` maps an aspect key to its ``(P,)`` int8 outcomes (``MISSING`` where not judged).
    ``artifact`` is ``(S,)`` int8 per sample: 1 flagged with an artifact, 0 judged and not flagged,
    -1 unknown. ``comparison`` is ``(P,)`` int64, the comparison each pair came from (for splits and
    majority metrics).
    """

    x: np.ndarray
    mask: np.ndarray
    prompt: np.ndarray | None
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    weight: np.ndarray
    aspects: dict[str, np.ndarray] = field(default_factory=dict)
    artifact: np.ndarray | None = None
    comparison: np.ndarray | None = None

    def __post_init__(self) -> None:
        s, k, _ = self.x.shape
        if self.mask.shape != (s, k):
            raise ValueError(f"mask has shape {self.mask.shape}, expected {(s, k)}")
        if self.prompt is not None and self.prompt.shape[0] != s:
            raise ValueError("prompt must have one row per sample")
        p = self.a.shape[0]
        for name in ("b", "outcome", "weight"):
            if getattr(self, name).shape != (p,):
                raise ValueError(f"{name} must have shape ({p},)")
        for key, values in self.aspects.items():
            if values.shape != (p,):
                raise ValueError(f"aspect {key!r} must have shape ({p},)")

    @property
    def num_pairs(self) -> int:
        return int(self.a.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[2])

    def subset(self, pair_index: np.ndarray) -> PairSet:
        """The same samples with only the pairs at ``pair_index`` (features are shared, not copied)."""
        return PairSet(
            x=self.x,
            mask=self.mask,
            prompt=self.prompt,
            a=self.a[pair_index],
            b=self.b[pair_index],
            outcome=self.outcome[pair_index],
            weight=self.weight[pair_index],
            aspects={k: v[pair_index] for k, v in self.aspects.items()},
            artifact=self.artifact,
            comparison=None if self.comparison is None else self.comparison[pair_index],
        )
