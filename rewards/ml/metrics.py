"""Evaluation of a reward model on judged pairs. Every value is a plain Python int/float (JSON-ready), or
None where it is undefined (no decisive pair, a single class, ...)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rewards.ml.data import A_WINS, B_WINS, TIE, PairSet
from rewards.ml.model import RewardModel

_EPS = 1e-12


def evaluate(model: RewardModel, pairs: PairSet, *, bins: int = 10) -> dict[str, Any]:
    """Metrics of ``model`` on ``pairs``.

    - ``pairs``: decisive pairs (A_WINS/B_WINS) counted; ``accuracy``, ``log_loss`` and ``ece`` are over
      them, weighted by ``pairs.weight`` (a prediction of exactly 0.5 counts half right).
    - ``ece``: expected calibration error of ``prob_first_wins`` with ``bins`` equal-width bins, computed on
      both orientations of every pair so it does not depend on which sample is ``a``.
    - ``aspect_accuracy``: per aspect of the data, accuracy on that aspect's decisive labels, using the
      aspect's own head when the model has one and the overall reward otherwise.
    - ``tie_rate``: weighted share of ties among pairs that are decisive or tied (both-bad and missing
      left out); ``predicted_tie_rate``: the model's mean tie probability over those same pairs (models
      with a tie model only).
    - ensembles: ``mean_uncertainty``, the mean over decisive pairs of the members' std of
      ``prob_first_wins``.
    - artifact models: ``artifact_samples``, ``artifact_accuracy`` (threshold 0.5) and ``artifact_auc`` on
      the samples labelled 0/1 in ``pairs.artifact``.
    """
    outcome = np.asarray(pairs.outcome)
    weight = np.asarray(pairs.weight, dtype=np.float64)
    decisive = np.flatnonzero((outcome == A_WINS) | (outcome == B_WINS))
    result: dict[str, Any] = {
        "pairs": int(decisive.size),
        "accuracy": None,
        "log_loss": None,
        "ece": None,
        "aspect_accuracy": {},
        "tie_rate": None,
    }
    needed = decisive.size > 0 or any(_decisive(v).size for v in pairs.aspects.values())
    needed = needed or (model.pairwise and model.ties != "none")
    outputs = model.pair_outputs(pairs) if needed and pairs.num_pairs else None

    if outputs is not None and decisive.size:
        p = model.prob_first_wins(outputs[decisive]).astype(np.float64)
        y = (outcome[decisive] == A_WINS).astype(np.float64)
        w = weight[decisive]
        result["accuracy"] = accuracy(p, y, w)
        pick = np.clip(np.where(y == 1, p, 1.0 - p), _EPS, 1.0)
        result["log_loss"] = float(-(w * np.log(pick)).sum() / w.sum()) if w.sum() > 0 else None
        result["ece"] = expected_calibration_error(p, y, w, bins=bins)
        if model.kind == "ensemble":
            spread = model.pair_uncertainty(outputs[decisive])
            assert spread is not None
            result["mean_uncertainty"] = float(spread.mean())

    for key, values in sorted(pairs.aspects.items()):
        index = _decisive(values)
        if outputs is None or not index.size:
            result["aspect_accuracy"][key] = None
            continue
        head = key if key in model.aspect_names else None
        p = model.prob_first_wins(outputs[index], aspect=head).astype(np.float64)
        y = (np.asarray(values)[index] == A_WINS).astype(np.float64)
        result["aspect_accuracy"][key] = accuracy(p, y, weight[index])

    counted = np.flatnonzero(np.isin(outcome, (A_WINS, B_WINS, TIE)))
    if counted.size and weight[counted].sum() > 0:
        w = weight[counted]
        result["tie_rate"] = float((w * (outcome[counted] == TIE)).sum() / w.sum())
        if outputs is not None and model.pairwise and model.ties != "none":
            tie_prob = model.outcome_probs(outputs[counted])[:, 1].astype(np.float64)
            result["predicted_tie_rate"] = float((w * tie_prob).sum() / w.sum())

    if model.kind == "artifact":
        result.update(_artifact_metrics(model, pairs))
    return result


def _decisive(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return np.flatnonzero((values == A_WINS) | (values == B_WINS))


def _artifact_metrics(model: RewardModel, pairs: PairSet) -> dict[str, Any]:
    labels = np.asarray(pairs.artifact) if pairs.artifact is not None else np.zeros(0, dtype=np.int8)
    index = np.flatnonzero(labels >= 0)
    out: dict[str, Any] = {
        "artifact_samples": int(index.size),
        "artifact_accuracy": None,
        "artifact_auc": None,
    }
    if not index.size:
        return out
    prompt = pairs.prompt[index] if pairs.prompt is not None else None
    prob = model.score(pairs.x[index], pairs.mask[index], prompt).artifact_prob
    assert prob is not None
    y = labels[index].astype(np.float64)
    out["artifact_accuracy"] = accuracy(prob.astype(np.float64), y, np.ones_like(y))
    out["artifact_auc"] = auc(prob.astype(np.float64), y)
    return out


def accuracy(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float | None:
    """Weighted share of ``p > 0.5`` agreeing with ``y`` in {0, 1}; ``p == 0.5`` counts half."""
    if w.sum() <= 0:
        return None
    correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1)).astype(np.float64))
    return float((w * correct).sum() / w.sum())


def expected_calibration_error(
    p: np.ndarray, y: np.ndarray, w: np.ndarray, *, bins: int = 10
) -> float | None:
    """Weighted ECE with ``bins`` equal-width bins over [0, 1]: sum over bins of (bin weight share) x
    |mean predicted - observed frequency|. Each pair enters twice, as (p, y) and (1 - p, 1 - y), so the
    value does not depend on the pairs' orientation."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    p2 = np.concatenate([p, 1.0 - p])
    y2 = np.concatenate([y, 1.0 - y])
    w2 = np.concatenate([w, w])
    total = w2.sum()
    if total <= 0:
        return None
    # Rounded to 1e-6 for binning only, so that float32 noise cannot put 0.2 and 1 - 0.8 (= 0.19999998)
    # on different sides of a bin edge and break the symmetry.
    which = np.minimum(np.floor(np.round(p2, 6) * bins + 1e-9).astype(np.int64), bins - 1)
    bin_w = np.bincount(which, weights=w2, minlength=bins)
    bin_p = np.bincount(which, weights=w2 * p2, minlength=bins)
    bin_y = np.bincount(which, weights=w2 * y2, minlength=bins)
    full = bin_w > 0
    gaps = np.abs(bin_p[full] - bin_y[full])  # = bin weight x |mean p - mean y|
    return float(gaps.sum() / total)


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (labels 1 = positive): the probability that a random positive scores above
    a random negative, ties counting half (Mann-Whitney U from average ranks). None with a single class."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n_pos = int((labels == 1).sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average rank (1-based) within each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def majority_agreement(model: RewardModel, pairs: PairSet) -> dict[str, Any]:
    """Agreement of the model with the annotators' majority.

    Pairs are grouped by comparison (``pairs.comparison``; by sample pair when it is None) and by the
    unordered pair of samples, so both orientations vote together. Each group's majority is the side
    with more decisive vote weight; a draw (or no decisive vote) skips the group. ``accuracy`` is the
    share of groups where the model's preferred sample (``prob_first_wins > 0.5``; exactly 0.5 counts
    half) is the majority's; ``comparisons`` is how many groups had a majority.
    """
    outcome = np.asarray(pairs.outcome)
    decisive = np.flatnonzero((outcome == A_WINS) | (outcome == B_WINS))
    if not decisive.size:
        return {"comparisons": 0, "accuracy": None}
    a = np.asarray(pairs.a)[decisive]
    b = np.asarray(pairs.b)[decisive]
    low, high = np.minimum(a, b), np.maximum(a, b)
    comparison = np.zeros_like(low) if pairs.comparison is None else np.asarray(pairs.comparison)[decisive]
    # +weight when the lower-numbered sample won.
    low_won = (outcome[decisive] == A_WINS) == (a == low)
    vote = np.where(low_won, 1.0, -1.0) * np.asarray(pairs.weight, dtype=np.float64)[decisive]
    keys = np.stack([comparison, low, high], axis=1)
    groups, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    net = np.bincount(inverse.reshape(-1), weights=vote, minlength=len(groups))
    with_majority = np.flatnonzero(net != 0)
    if not with_majority.size:
        return {"comparisons": 0, "accuracy": None}
    rep = decisive[first[with_majority]]  # one pair per group: same two samples, same prediction
    p = model.prob_first_wins(pairs.subset(rep)).astype(np.float64)
    p_low = np.where(np.asarray(pairs.a)[rep] == low[first[with_majority]], p, 1.0 - p)
    y = (net[with_majority] > 0).astype(np.float64)
    acc = accuracy(p_low, y, np.ones_like(y))
    return {"comparisons": int(with_majority.size), "accuracy": acc}


def holdout_metrics(model: RewardModel, holdout: PairSet | None) -> dict[str, Any]:
    """``evaluate`` on the holdout set with keys prefixed ``holdout_`` (empty without a holdout)."""
    if holdout is None:
        return {}
    return {f"holdout_{key}": value for key, value in evaluate(model, holdout).items()}
