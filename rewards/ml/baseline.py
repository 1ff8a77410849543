"""The baseline a reward model must beat: L2-regularised logistic regression on the same frozen features.

A pair (a, b) becomes the difference of its samples' features, ``phi(a) - phi(b)`` with
``phi(s) = [x_s, x_s * prompt_s]`` (the heads' PickScore-like interaction, when prompt-conditioned) or
``x_s`` alone, each feature scaled by its standard deviation over the training samples (the heads'
standardiser does the same). P(a wins) = sigmoid(w . (phi(a) - phi(b))), no intercept, so swapping a and b
flips the prediction exactly as in Bradley-Terry. The L2 strength C is chosen on the same kind of inner
split of the training pairs the heads use (``heads.inner_split``, same seed), by its log-loss, then the
model is refitted on every training pair. Ties, both-bad and missing outcomes do not train it.

scikit-learn's ``LogisticRegression`` (lbfgs) does the fitting: a well-known reference, not our code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from rewards.ml.data import A_WINS, B_WINS, PairSet
from rewards.ml.heads import inner_split
from rewards.ml.metrics import accuracy, expected_calibration_error

# Inverse L2 strengths tried (scikit-learn's C: larger = weaker penalty).
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 11))


@dataclass
class BaselineResult:
    """Held-out figures of the baseline (None where undefined: no decisive held-out pair)."""

    accuracy: float | None
    ece: float | None
    log_loss: float | None
    c: float  # the chosen inverse L2 strength
    train_pairs: int  # decisive training pairs it was fitted on
    holdout_pairs: int  # decisive held-out pairs it was evaluated on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_features(pairs: PairSet, *, use_prompt: bool) -> np.ndarray:
    """``(S, I)`` float64 per-sample features: mean over real vectors, then ``[x, x * prompt]`` when
    ``use_prompt`` and the pairs have prompts."""
    m = pairs.mask.astype(np.float64)[..., None]
    x = (pairs.x.astype(np.float64) * m).sum(1) / m.sum(1)
    if use_prompt and pairs.prompt is not None:
        x = np.concatenate([x, x * pairs.prompt.astype(np.float64)], axis=1)
    return x


def _decisive(pairs: PairSet) -> np.ndarray:
    outcome = np.asarray(pairs.outcome)
    return np.flatnonzero(((outcome == A_WINS) | (outcome == B_WINS)) & (np.asarray(pairs.weight) > 0))


def pair_features(pairs: PairSet, index: np.ndarray, scale: np.ndarray, *, use_prompt: bool) -> np.ndarray:
    """``(P, I)`` scaled feature differences ``(phi(a) - phi(b)) / scale`` of the pairs at ``index``."""
    phi = sample_features(pairs, use_prompt=use_prompt)
    return (phi[pairs.a[index]] - phi[pairs.b[index]]) / scale


def feature_scale(pairs: PairSet, index: np.ndarray, *, use_prompt: bool) -> np.ndarray:
    """Standard deviation of each feature over the samples the pairs at ``index`` use (1 where constant)."""
    phi = sample_features(pairs, use_prompt=use_prompt)
    used = np.unique(np.concatenate([pairs.a[index], pairs.b[index]]))
    std = phi[used].std(0)
    return np.where(std > 1e-3 * np.median(std), std, 1.0)


def _fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float) -> LogisticRegression:
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000, tol=1e-6)
    model.fit(x, y, sample_weight=w)
    return model


def _log_loss(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-(w * np.where(y == 1, np.log(p), np.log1p(-p))).sum() / w.sum())


def logistic_baseline(
    train: PairSet,
    holdout: PairSet,
    *,
    use_prompt: bool = True,
    val_fraction: float = 0.1,
    min_val_pairs: int = 32,
    seed: int = 0,
    cs: tuple[float, ...] = DEFAULT_CS,
) -> BaselineResult:
    """Fit the baseline on ``train``'s decisive pairs (C chosen on an inner split of them, never on
    ``holdout``) and evaluate it on ``holdout``'s decisive pairs: accuracy, ECE and log-loss, computed as
    ``rewards.ml.metrics.evaluate`` computes them for a reward model. ``use_prompt`` should be what the
    head it is compared with used. Without an inner split (too few pairs) the middle of ``cs`` is used."""
    if not cs:
        raise ValueError("cs must list at least one inverse L2 strength")
    rows = _decisive(train)
    if rows.size == 0:
        raise ValueError("the baseline needs decisive training pairs (a or b won)")
    y_all = (train.outcome[rows] == A_WINS).astype(np.int64)
    w_all = train.weight[rows].astype(np.float64)
    # One class only: orient half of the pairs the other way, which changes nothing for a model
    # without an intercept, so lbfgs sees two classes.
    one_class = np.unique(y_all).size < 2
    flip = np.arange(rows.size) % 2 == 1 if one_class else np.zeros(rows.size, dtype=bool)
    scale = feature_scale(train, rows, use_prompt=use_prompt)
    x_all = pair_features(train, rows, scale, use_prompt=use_prompt)
    x_all[flip] *= -1
    y_all = np.where(flip, 1 - y_all, y_all)

    groups = None if train.comparison is None else train.comparison[rows]
    fit, val = inner_split(rows.size, groups, fraction=val_fraction, min_pairs=min_val_pairs, seed=seed)
    if val.size and np.unique(y_all[fit]).size == 2:
        losses = []
        for c in cs:
            p = _fit(x_all[fit], y_all[fit], w_all[fit], c).predict_proba(x_all[val])[:, 1]
            losses.append(_log_loss(p, y_all[val], w_all[val]))
        best_c = float(cs[int(np.argmin(losses))])
    else:
        best_c = float(cs[len(cs) // 2])
    model = _fit(x_all, y_all, w_all, best_c)

    held = _decisive(holdout)
    if held.size == 0:
        return BaselineResult(None, None, None, best_c, int(rows.size), 0)
    p = model.predict_proba(pair_features(holdout, held, scale, use_prompt=use_prompt))[:, 1]
    y = (holdout.outcome[held] == A_WINS).astype(np.float64)
    w = holdout.weight[held].astype(np.float64)
    loss = _log_loss(p, y, w)
    return BaselineResult(
        accuracy=accuracy(p, y, w),
        ece=expected_calibration_error(p, y, w),
        log_loss=loss if math.isfinite(loss) else None,
        c=best_c,
        train_pairs=int(rows.size),
        holdout_pairs=int(held.size),
    )
