"""Synthetic cached features with a hidden "gold" preference, for the reward-model tests (no Django).

Samples are random unit vectors; the gold reward is linear in the (pooled) features, plus a
prompt-alignment term when prompts are used. Pairs are labelled by the gold rule with label noise and,
optionally, ties for near-equal pairs. Train and holdout pairs use disjoint samples, so holdout accuracy
measures generalisation to new samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewards.ml.data import A_WINS, B_WINS, MISSING, TIE, PairSet


@dataclass
class Synthetic:
    train: PairSet
    holdout: PairSet
    gold: np.ndarray  # (S,) gold reward of every sample
    aspect_gold: dict[str, np.ndarray]  # (S,) gold reward of every sample per aspect


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def label(diff: np.ndarray, rng: np.random.Generator, *, noise: float, tie_margin: float) -> np.ndarray:
    """Gold sign of ``diff`` with ``noise`` of the decisive labels flipped; |diff| < tie_margin -> TIE."""
    outcome = np.where(diff > 0, A_WINS, B_WINS)
    outcome = np.where(rng.random(diff.shape) < noise, -outcome, outcome)
    return np.where(np.abs(diff) < tie_margin, TIE, outcome).astype(np.int8)


def pairs_within(groups: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random pairs (a != b) of samples in the same group."""
    a_out: list[np.ndarray] = []
    b_out: list[np.ndarray] = []
    while sum(int(a.size) for a in a_out) < n_pairs:
        a = rng.integers(0, len(groups), n_pairs)
        b = rng.integers(0, len(groups), n_pairs)
        ok = (a != b) & (groups[a] == groups[b])
        a_out.append(a[ok])
        b_out.append(b[ok])
    return np.concatenate(a_out)[:n_pairs], np.concatenate(b_out)[:n_pairs]


def make(
    *,
    seed: int = 0,
    dim: int = 32,
    n_samples: int = 1200,
    n_pairs: int = 6000,
    n_holdout: int = 2000,
    noise: float = 0.1,
    tie_rate: float = 0.0,
    n_prompts: int = 0,
    aspects: int = 0,
    aspect_missing: float = 0.2,
    artifact: bool = False,
    artifact_noise: float = 0.02,
    subspace: int = 0,
) -> Synthetic:
    """K=1 features. ``n_prompts`` > 0: prompt-conditioned, and the gold reward adds 3 x <x, prompt>.
    ``aspects`` > 0: aspect ``aspect{i}`` has its own gold direction, the overall gold is their sum and
    each aspect outcome is MISSING for ``aspect_missing`` of the pairs. ``tie_rate``: that share of pairs
    (the closest in gold) is labelled TIE. ``artifact``: samples with <x, u> in the top 25% are flagged,
    ``artifact_noise`` of labels flipped, 10% unlabelled. ``subspace`` > 0: the features live (almost) in
    their first ``subspace`` coordinates, the others scaled down 20x, so vectors along the others are
    out of distribution."""
    rng = np.random.default_rng(seed)
    s = n_samples
    raw = rng.normal(size=(s, dim))
    if subspace:
        raw[:, subspace:] *= 0.05
    x = unit(raw)
    prompt = None
    group = np.zeros(s, dtype=np.int64)
    aspect_gold: dict[str, np.ndarray] = {}
    if aspects:
        for i in range(aspects):
            aspect_gold[f"aspect{i}"] = np.sqrt(dim) * (x @ unit(rng.normal(size=dim)))
        gold = np.sum(list(aspect_gold.values()), axis=0)
    else:
        gold = np.sqrt(dim) * (x @ unit(rng.normal(size=dim)))
    if n_prompts:
        prompts = unit(rng.normal(size=(n_prompts, dim)))
        group = rng.integers(0, n_prompts, s)
        # Samples lean towards their own prompt by a random amount, so alignment varies within a prompt.
        x = unit(x + rng.uniform(0, 1.5, (s, 1)) * prompts[group])
        prompt = prompts[group]
        gold = 0.5 * np.sqrt(dim) * (x @ unit(rng.normal(size=dim))) + 3 * np.sqrt(dim) * (x * prompt).sum(1)

    # Train pairs over the first 2/3 of the samples, holdout pairs over the rest.
    split = (2 * s) // 3
    a_tr, b_tr = pairs_within(group[:split], n_pairs, rng)
    a_ho, b_ho = pairs_within(group[split:], n_holdout, rng)
    a = np.concatenate([a_tr, a_ho + split])
    b = np.concatenate([b_tr, b_ho + split])
    diff = gold[a] - gold[b]
    margin = float(np.quantile(np.abs(diff), tie_rate)) if tie_rate > 0 else 0.0
    outcome = label(diff, rng, noise=noise, tie_margin=margin)
    aspect_outcomes = {}
    for key, g in aspect_gold.items():
        o = label(g[a] - g[b], rng, noise=noise, tie_margin=0.0)
        aspect_outcomes[key] = np.where(rng.random(len(a)) < aspect_missing, MISSING, o).astype(np.int8)
    flags = None
    if artifact:
        score = x @ unit(rng.normal(size=dim))
        flags = (score > np.quantile(score, 0.75)).astype(np.int8)
        flags = np.where(rng.random(s) < artifact_noise, 1 - flags, flags).astype(np.int8)
        flags[rng.random(s) < 0.1] = -1
    full = PairSet(
        x=x[:, None, :],
        mask=np.ones((s, 1), dtype=bool),
        prompt=prompt,
        a=a.astype(np.int64),
        b=b.astype(np.int64),
        outcome=outcome,
        weight=np.ones(len(a), dtype=np.float32),
        aspects=aspect_outcomes,
        artifact=flags,
        comparison=np.arange(len(a), dtype=np.int64),
    )
    p = len(a_tr)
    train, holdout = full.subset(np.arange(p)), full.subset(np.arange(p, len(a)))
    if flags is not None:
        # Artifact labels split by sample: the holdout set only sees the holdout samples' labels.
        train.artifact = np.where(np.arange(s) < split, flags, -1).astype(np.int8)
        holdout.artifact = np.where(np.arange(s) >= split, flags, -1).astype(np.int8)
    return Synthetic(train=train, holdout=holdout, gold=gold, aspect_gold=aspect_gold)


def make_video(
    *, seed: int = 0, dim: int = 32, n_samples: int = 1500, n_pairs: int = 6000, k: int = 4
) -> Synthetic:
    """K=4 frames (some samples have only 2 or 3, the rest masked). One *key* frame per sample, at a random
    position, stands out along a direction ``u``; the gold reward is ``<w, key frame>`` (w orthogonal to u).
    Mean pooling dilutes the key frame with the others; attention pooling can find it."""
    rng = np.random.default_rng(seed)
    s = n_samples
    u = unit(rng.normal(size=dim))
    w = rng.normal(size=dim)
    w = unit(w - (w @ u) * u)
    frames = rng.normal(size=(s, k, dim))
    frames -= (frames @ u)[..., None] * u  # only the key frame has a u component
    lengths = rng.integers(2, k + 1, s)
    mask = np.arange(k)[None, :] < lengths[:, None]
    key = rng.integers(0, lengths)
    frames[np.arange(s), key] += 2.5 * np.sqrt(dim) * u
    x = unit(frames) * mask[..., None]
    gold = np.sqrt(dim) * (x[np.arange(s), key] @ w)
    split = (2 * s) // 3
    zeros = np.zeros(s, dtype=np.int64)
    a_tr, b_tr = pairs_within(zeros[:split], n_pairs, rng)
    a_ho, b_ho = pairs_within(zeros[split:], 2000, rng)
    a = np.concatenate([a_tr, a_ho + split]).astype(np.int64)
    b = np.concatenate([b_tr, b_ho + split]).astype(np.int64)
    outcome = label(gold[a] - gold[b], rng, noise=0.1, tie_margin=0.0)
    full = PairSet(
        x=x.astype(np.float32),
        mask=mask,
        prompt=None,
        a=a,
        b=b,
        outcome=outcome,
        weight=np.ones(len(a), dtype=np.float32),
    )
    p = len(a_tr)
    return Synthetic(
        train=full.subset(np.arange(p)), holdout=full.subset(np.arange(p, len(a))), gold=gold, aspect_gold={}
    )


def gold_accuracy(prob_first_wins: np.ndarray, pairs: PairSet, gold: np.ndarray) -> float:
    """Share of pairs (with distinct gold) where the model's preferred sample is the gold one."""
    diff = gold[pairs.a] - gold[pairs.b]
    use = diff != 0
    return float(((prob_first_wins[use] > 0.5) == (diff[use] > 0)).mean())
