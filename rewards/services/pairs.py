"""Training data from a snapshot: the judged pairs of a raw snapshot file and the train/held-out
split, with the launch minimums.

The pair and split rules are numpy code in ``rewards.ml.pairs`` (no Django); this module reads the
snapshot's file and turns a split that is too small into a clear 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
from django.conf import settings

from annotate.errors import Invalid
from annotate.models import DatasetSnapshot, Project
from rewards.ml.pairs import JudgedPairs, Split, judged_pairs, split_indices, split_pairs

__all__ = ["JudgedPairs", "Split", "pairs_split", "snapshot_pairs", "split_indices"]


# Fewer judged pairs than this cannot give a meaningful model; the launch check and the worker
# both ask for this many training pairs after the hold-out, and for at least min_holdout_pairs()
# held-out ones, without which a version has no figure to be judged on.
def min_pairs() -> int:
    return int(getattr(settings, "RL_REWARD_MIN_PAIRS", 10))


def min_holdout_pairs() -> int:
    return int(getattr(settings, "RL_REWARD_MIN_HOLDOUT_PAIRS", 1))


def _snapshot_rows(snapshot: DatasetSnapshot) -> Iterable[dict[str, Any]]:
    spec = snapshot.spec
    with snapshot.file.open("rb") as fh:
        if spec.get("format") == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(
                fh,
                columns=[
                    "comparison_id",
                    "sample_ids",
                    "outcome",
                    "ranking",
                    "aspects",
                    "artifacts",
                    "is_gold",
                    "gold_answer",
                ],
            )
            yield from table.to_pylist()
        else:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def snapshot_pairs(*, snapshot: DatasetSnapshot) -> JudgedPairs:
    """Every judged pair in a raw snapshot (``rewards.ml.pairs.judged_pairs`` over its rows)."""
    return judged_pairs(_snapshot_rows(snapshot))


def split_check(*, kind: str, total: int, train: int, held: int, holdout: float) -> None:
    """Refuse a job whose pairs are too few once split (at launch and again in the worker)."""
    if total < min_pairs():
        raise Invalid(
            f"too few judged pairs to train on: {total} (at least {min_pairs()} needed)",
            code="too_few_pairs",
            details={"pairs": total, "min_pairs": min_pairs()},
        )
    if kind == "artifact":  # trained on per-sample flags, not on the pairs
        return
    if train < min_pairs() or held < min_holdout_pairs():
        raise Invalid(
            f"too few judged pairs to train on: holding out {holdout:.0%} of the comparisons leaves "
            f"{train} training and {held} held-out pairs of {total}; at least {min_pairs()} training "
            f"and {min_holdout_pairs()} held-out pairs are needed (judge more comparisons)",
            code="too_few_pairs",
            details={
                "pairs": total,
                "train_pairs": train,
                "holdout_pairs": held,
                "min_train_pairs": min_pairs(),
                "min_holdout_pairs": min_holdout_pairs(),
            },
        )


def pairs_split(
    *,
    project: Project,
    pairs: JudgedPairs,
    x: np.ndarray,
    mask: np.ndarray,
    prompt: np.ndarray,
    holdout: float,
) -> Split:
    """Train/held-out/gold PairSets, held out by comparison with the project's stable hash
    (``rewards.ml.pairs.split_pairs``)."""
    return split_pairs(salt_id=project.id, pairs=pairs, x=x, mask=mask, prompt=prompt, holdout=holdout)
