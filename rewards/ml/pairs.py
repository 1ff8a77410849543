"""Judged pairs and the held-out split, in numpy (no Django): the rows of a raw snapshot become
index pairs over the samples they name, and a stable hash decides which comparisons are held out.

The Django side (``rewards.services.pairs``) reads the snapshot file and attaches features; the
rules here are the ones the launch check and the worker both apply, so they always agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.ml.data import PairSet

OUTCOME = {"a": 1, "b": -1, "tie": 0, "both_bad": 2}


@dataclass
class JudgedPairs:
    """Pairs read from a raw snapshot, as sample ids (features are attached later)."""

    sample_ids: list[int]  # index -> sample id
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    comparison: np.ndarray
    aspects: dict[str, np.ndarray]
    artifact: np.ndarray  # per sample: 1 flagged, 0 judged clean
    gold_a: np.ndarray  # one pair per gold comparison
    gold_b: np.ndarray
    gold_outcome: np.ndarray
    gold_comparison: np.ndarray
    gold_comparisons: set[int]


def _json_field(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value else value


def judged_pairs(rows: Iterable[dict[str, Any]]) -> JudgedPairs:
    """Every judged pair in the rows of a raw snapshot. Rankings give all their ordered pairs; aspects
    and artifact flags come along; gold comparisons also give one pair from their gold answer."""
    index: dict[int, int] = {}

    def ix(sid: int) -> int:
        return index.setdefault(int(sid), len(index))

    a: list[int] = []
    b: list[int] = []
    outcome: list[int] = []
    comparison: list[int] = []
    aspect_rows: list[dict[str, Any]] = []
    flagged: dict[int, int] = {}
    gold: dict[int, tuple[int, int, int]] = {}
    for row in rows:
        ids = [int(s) for s in row["sample_ids"]]
        cid = int(row["comparison_id"])
        flags = {
            int(f["sample"])
            for f in (_json_field(row.get("artifacts")) or [])
            if isinstance(f, dict) and f.get("sample") is not None
        }
        for sid in ids:
            i = ix(sid)
            flagged[i] = max(flagged.get(i, 0), 1 if sid in flags else 0)
        if row.get("is_gold"):
            answer = _json_field(row.get("gold_answer")) or {}
            if answer.get("outcome") in OUTCOME and len(ids) == 2:
                gold[cid] = (ix(ids[0]), ix(ids[1]), OUTCOME[answer["outcome"]])
        if row["outcome"] == "ranking":
            ranking = [int(s) for s in (row.get("ranking") or [])]
            for i in range(len(ranking)):
                for j in range(i + 1, len(ranking)):
                    a.append(ix(ranking[i]))
                    b.append(ix(ranking[j]))
                    outcome.append(1)
                    comparison.append(cid)
                    aspect_rows.append({})
            continue
        if len(ids) != 2 or row["outcome"] not in OUTCOME:
            continue
        a.append(ix(ids[0]))
        b.append(ix(ids[1]))
        outcome.append(OUTCOME[row["outcome"]])
        comparison.append(cid)
        aspect_rows.append(_json_field(row.get("aspects")) or {})
    keys = sorted({k for r in aspect_rows for k in r})
    aspects = {
        k: np.array([OUTCOME.get(str(r.get(k)), 127) for r in aspect_rows], dtype=np.int8) for k in keys
    }
    sample_ids = [0] * len(index)
    for sid, i in index.items():
        sample_ids[i] = sid
    g = list(gold.items())
    return JudgedPairs(
        sample_ids=sample_ids,
        a=np.array(a, dtype=np.int64),
        b=np.array(b, dtype=np.int64),
        outcome=np.array(outcome, dtype=np.int8),
        comparison=np.array(comparison, dtype=np.int64),
        aspects=aspects,
        artifact=np.array([flagged.get(i, -1) for i in range(len(sample_ids))], dtype=np.int8),
        gold_a=np.array([v[0] for _, v in g], dtype=np.int64),
        gold_b=np.array([v[1] for _, v in g], dtype=np.int64),
        gold_outcome=np.array([v[2] for _, v in g], dtype=np.int8),
        gold_comparison=np.array([c for c, _ in g], dtype=np.int64),
        gold_comparisons=set(gold),
    )


def unit_hash(salt_id: int, ids: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per id: the held-out split must be the same for every
    version of a project, so that champion and challenger are compared on pairs neither trained on."""
    out = np.empty(len(ids), dtype=np.float64)
    salt = str(salt_id).encode()
    for i, value in enumerate(ids):
        digest = hashlib.blake2b(salt + b":" + str(int(value)).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64
    return out


def split_indices(
    salt_id: int, comparison: np.ndarray, gold_comparisons: set[int], holdout: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out pairs, given each pair's comparison id (``salt_id``: the
    project): the one rule that both the launch check and the worker apply."""
    comparison = np.asarray(comparison, dtype=np.int64)
    cids = np.unique(comparison)
    held = cids[unit_hash(salt_id, cids) < holdout]
    is_gold = np.isin(comparison, np.array(sorted(gold_comparisons), dtype=np.int64))
    is_held = np.isin(comparison, held)
    return np.flatnonzero(~is_gold & ~is_held), np.flatnonzero(~is_gold & is_held)


@dataclass
class Split:
    train: PairSet
    holdout: PairSet
    gold: PairSet
    sample_ids: list[int]


def split_pairs(
    *, salt_id: int, pairs: JudgedPairs, x: np.ndarray, mask: np.ndarray, prompt: np.ndarray, holdout: float
) -> Split:
    """Train/held-out/gold PairSets. Held out by comparison (every vote on a comparison goes to the
    same side) with a stable hash salted by the project; gold comparisons never train, they are
    scored apart. Artifact labels split by sample, with the same hash."""
    train_idx, held_idx = split_indices(salt_id, pairs.comparison, pairs.gold_comparisons, holdout)
    sample_held = unit_hash(salt_id, np.array(pairs.sample_ids, dtype=np.int64)) < holdout
    art_train = np.where(sample_held, -1, pairs.artifact).astype(np.int8)
    art_held = np.where(sample_held, pairs.artifact, -1).astype(np.int8)
    n = pairs.a.shape[0]
    full = PairSet(
        x=x,
        mask=mask,
        prompt=prompt,
        a=pairs.a,
        b=pairs.b,
        outcome=pairs.outcome,
        weight=np.ones(n, dtype=np.float32),
        aspects=pairs.aspects,
        artifact=pairs.artifact,
        comparison=pairs.comparison,
    )
    train = full.subset(train_idx)
    train.artifact = art_train
    held_set = full.subset(held_idx)
    held_set.artifact = art_held
    gold = PairSet(
        x=x,
        mask=mask,
        prompt=prompt,
        a=pairs.gold_a,
        b=pairs.gold_b,
        outcome=pairs.gold_outcome,
        weight=np.ones(pairs.gold_a.shape[0], dtype=np.float32),
        comparison=pairs.gold_comparison,
    )
    return Split(train=train, holdout=held_set, gold=gold, sample_ids=pairs.sample_ids)
