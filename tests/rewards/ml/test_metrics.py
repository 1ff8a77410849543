"""Metrics on hand-made cases with exact expected values. The models are linear heads on 1-d features with
their weights set by hand, so reward = feature (or a multiple of it, per head)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from rewards.ml.data import A_WINS, B_WINS, BOTH_BAD, MISSING, TIE, PairSet
from rewards.ml.kinds import CONFIGS, KINDS
from rewards.ml.metrics import auc, evaluate, expected_calibration_error, majority_agreement
from rewards.ml.model import RewardModel

LOG4 = math.log(4.0)  # a reward difference of log 4 makes sigmoid(d) = 0.8


def stub(
    kind: str = "bt", slopes: tuple[float, ...] = (1.0,), tie_param: float = 0.0, **config: Any
) -> RewardModel:
    """A ``kind`` model on 1-d features whose head h outputs ``slopes[h] * x``; no tie model unless asked."""
    if kind != "artifact":
        config.setdefault("ties", "none")
    resolved = CONFIGS[kind](hidden=0, **config).to_dict()
    model = KINDS[kind](config=resolved, dim=1, k=1, prompt_conditioned=False)
    assert model.n_heads == len(slopes)
    with torch.no_grad():
        model.scorer.out_weight.copy_(torch.tensor(slopes)[:, None])
        model.scorer.out_bias.zero_()
        if model.tie_param is not None:
            model.tie_param.fill_(tie_param)
    return model.eval()


def pairset(
    rewards: list[float],
    pairs: list[tuple[int, int, int]],
    *,
    weight: list[float] | None = None,
    comparison: list[int] | None = None,
    aspects: dict[str, list[int]] | None = None,
    artifact: list[int] | None = None,
) -> PairSet:
    s = len(rewards)
    return PairSet(
        x=np.array(rewards, dtype=np.float32).reshape(s, 1, 1),
        mask=np.ones((s, 1), dtype=bool),
        prompt=None,
        a=np.array([p[0] for p in pairs], dtype=np.int64),
        b=np.array([p[1] for p in pairs], dtype=np.int64),
        outcome=np.array([p[2] for p in pairs], dtype=np.int8),
        weight=np.array(weight or [1.0] * len(pairs), dtype=np.float32),
        aspects={k: np.array(v, dtype=np.int8) for k, v in (aspects or {}).items()},
        artifact=None if artifact is None else np.array(artifact, dtype=np.int8),
        comparison=None if comparison is None else np.array(comparison, dtype=np.int64),
    )


# Sample 0 has reward log 4, sample 1 reward 0: the model gives sample 0 a 0.8 chance against sample 1.
# Sample 0 wins 4 of the 5 decisive pairs, written either way round.
CALIBRATED_PAIRS = [(0, 1, A_WINS), (0, 1, A_WINS), (1, 0, B_WINS), (0, 1, A_WINS), (1, 0, A_WINS)]
CALIBRATED = pairset([LOG4, 0.0], [*CALIBRATED_PAIRS, (0, 1, TIE), (0, 1, BOTH_BAD), (0, 1, MISSING)])


def test_accuracy_log_loss_ece_tie_rate() -> None:
    metrics = evaluate(stub(), CALIBRATED)
    assert metrics["pairs"] == 5
    assert metrics["accuracy"] == pytest.approx(0.8)  # 4 of 5 decisive pairs went to sample 0
    assert metrics["log_loss"] == pytest.approx(-(4 * math.log(0.8) + math.log(0.2)) / 5)
    assert metrics["ece"] == pytest.approx(0.0, abs=1e-6)  # says 0.8, happens 4 times in 5
    assert metrics["tie_rate"] == pytest.approx(1 / 6)  # both-bad and missing are not counted
    assert metrics["aspect_accuracy"] == {}
    assert "predicted_tie_rate" not in metrics  # ties="none": no tie model
    assert "mean_uncertainty" not in metrics and "artifact_auc" not in metrics
    json.dumps(metrics)
    assert all(isinstance(v, int | float) for k, v in metrics.items() if k != "aspect_accuracy")


def test_weighted_accuracy_and_overconfidence() -> None:
    # The one pair sample 1 won weighs 3: accuracy 4 / 7.
    weighted = pairset([LOG4, 0.0], CALIBRATED_PAIRS[:5], weight=[1, 1, 1, 1, 3])
    assert evaluate(stub(), weighted)["accuracy"] == pytest.approx(4 / 7)
    # Says 0.8, sample 0 always wins: off by 0.2 whichever way round the pairs are written.
    always = pairset([LOG4, 0.0], [(0, 1, A_WINS), (1, 0, B_WINS), (1, 0, B_WINS)])
    metrics = evaluate(stub(), always)
    assert metrics["accuracy"] == 1.0
    assert metrics["ece"] == pytest.approx(0.2)


def test_ece_function() -> None:
    ones = np.ones(5)
    assert expected_calibration_error(np.full(5, 0.8), np.array([1, 1, 1, 1, 0.0]), ones) == pytest.approx(
        0.0
    )
    # (0.9, 1) and (0.1, 1), mirrored: two bins, each predicting 0.9 / 0.1 where the truth is 0.5.
    assert expected_calibration_error(
        np.array([0.9, 0.1]), np.array([1.0, 1.0]), np.ones(2)
    ) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([0.7]), np.array([1.0]), np.zeros(1)) is None


def test_predicted_tie_rate_davidson_and_rao_kupper_conditional() -> None:
    # Davidson with nu = 1 at d = log 4: P(tie) = 1 / (2 cosh(log 2) + 1) = 1 / 3.5; decisive P = 0.8.
    davidson = stub(ties="davidson", tie_param=0.0)
    metrics = evaluate(davidson, CALIBRATED)
    assert metrics["predicted_tie_rate"] == pytest.approx(2 / 7)
    assert metrics["accuracy"] == pytest.approx(0.8)
    np.testing.assert_allclose(davidson.prob_first_wins(CALIBRATED)[:2], [0.8, 0.8], rtol=1e-6)
    # Rao-Kupper with theta = 2: P(a>b) = 4 / 6, P(b>a) = 1 / 9, so P(a>b | decisive) = 6 / 7.
    rao_kupper = stub(ties="rao_kupper", tie_param=0.0)
    np.testing.assert_allclose(rao_kupper.prob_first_wins(CALIBRATED)[:3], [6 / 7, 6 / 7, 1 / 7], rtol=1e-6)
    probs = rao_kupper.outcome_probs(CALIBRATED)[0]
    np.testing.assert_allclose(probs, [2 / 3, 1 - 2 / 3 - 1 / 9, 1 / 9], rtol=1e-6)


def test_no_decisive_pairs_gives_none() -> None:
    ties_only = pairset([LOG4, 0.0], [(0, 1, TIE), (0, 1, BOTH_BAD)], aspects={"style": [MISSING, TIE]})
    metrics = evaluate(stub(), ties_only)
    assert metrics == {
        "pairs": 0,
        "accuracy": None,
        "log_loss": None,
        "ece": None,
        "aspect_accuracy": {"style": None},
        "tie_rate": 1.0,
    }
    assert majority_agreement(stub(), ties_only) == {"comparisons": 0, "accuracy": None}


def test_aspect_accuracy_uses_the_aspect_head_or_the_overall_reward() -> None:
    pairs = pairset(
        [LOG4, 0.0],
        [(0, 1, A_WINS), (0, 1, A_WINS), (0, 1, A_WINS), (0, 1, A_WINS)],
        aspects={"style": [B_WINS, B_WINS, A_WINS, MISSING], "other": [A_WINS, A_WINS, B_WINS, TIE]},
    )
    # Overall reward: prefers sample 0 everywhere.
    plain = evaluate(stub(), pairs)["aspect_accuracy"]
    assert plain == {"style": pytest.approx(1 / 3), "other": pytest.approx(2 / 3)}
    # The style head prefers sample 1; "other" has no head, so the overall head answers for it.
    aspects = stub("aspects", slopes=(1.0, -1.0), ties="davidson", aspects=["style"])
    by_head = evaluate(aspects, pairs)["aspect_accuracy"]
    assert by_head == {"style": pytest.approx(2 / 3), "other": pytest.approx(2 / 3)}
    np.testing.assert_allclose(aspects.prob_first_wins(pairs, aspect="style"), [0.2] * 4, rtol=1e-6)
    with pytest.raises(ValueError, match="no head"):
        aspects.prob_first_wins(pairs, aspect="other")


def test_ensemble_mean_probability_and_uncertainty() -> None:
    # Members with slopes 1 and 2: P = 0.8 and 16 / 17.
    ensemble = stub("ensemble", slopes=(1.0, 2.0), n_members=2)
    pairs = pairset([LOG4, 0.0], [(0, 1, A_WINS), (1, 0, A_WINS)])
    mean, spread = (0.8 + 16 / 17) / 2, (16 / 17 - 0.8) / 2
    np.testing.assert_allclose(ensemble.prob_first_wins(pairs), [mean, 1 - mean], rtol=1e-6)
    uncertainty = ensemble.pair_uncertainty(pairs)
    assert uncertainty is not None
    np.testing.assert_allclose(uncertainty, [spread, spread], rtol=1e-5)
    metrics = evaluate(ensemble, pairs)
    assert metrics["accuracy"] == 0.5
    assert metrics["mean_uncertainty"] == pytest.approx(spread, rel=1e-5)
    out = ensemble.score(pairs.x, pairs.mask, None)
    np.testing.assert_allclose(out.reward, [1.5 * LOG4, 0.0], rtol=1e-6)
    assert out.uncertainty is not None
    np.testing.assert_allclose(out.uncertainty, [0.5 * LOG4, 0.0], rtol=1e-6, atol=1e-7)


def test_artifact_accuracy_and_auc() -> None:
    # logit = x: probabilities sigmoid(-2, -1, 1, 2) for labels 0, 1, 1, 1; the last sample is unlabelled.
    model = stub("artifact")
    pairs = pairset([-2.0, -1.0, 1.0, 2.0, 0.5], [(0, 3, A_WINS)], artifact=[0, 1, 1, 1, -1])
    metrics = evaluate(model, pairs)
    assert metrics["artifact_samples"] == 4
    assert metrics["artifact_accuracy"] == 0.75
    assert metrics["artifact_auc"] == 1.0
    # Reward = -logit: sample 0 (cleaner) is preferred over sample 3, as the pair says.
    assert metrics["accuracy"] == 1.0
    assert model.prob_first_wins(pairs)[0] == pytest.approx(1 / (1 + math.exp(-4.0)), rel=1e-6)


def test_auc_exact_values() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 2.0, 2.0, 3.0]), np.array([0, 0, 1, 1])) == 0.875  # a tie counts half
    assert auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert auc(np.array([0.2, 0.9]), np.array([1, 1])) is None


def test_majority_agreement() -> None:
    rewards = [2.0, 1.0, 0.0, 3.0]
    pairs = [
        # Comparison 1, samples 0 and 1: sample 0 wins 2 votes to 1 (one vote written the other way
        # round); the model prefers 0: agrees.
        (0, 1, A_WINS),
        (0, 1, A_WINS),
        (1, 0, A_WINS),
        # Comparison 2: one vote each way: a draw, skipped.
        (0, 2, A_WINS),
        (0, 2, B_WINS),
        # Comparison 3: sample 2 beats 3 twice; the model prefers 3: disagrees.
        (3, 2, B_WINS),
        (2, 3, A_WINS),
        # Comparison 4: only a tie: no majority, skipped.
        (1, 3, TIE),
    ]
    comparison = [1, 1, 1, 2, 2, 3, 3, 4]
    model = stub()
    assert majority_agreement(model, pairset(rewards, pairs, comparison=comparison)) == {
        "comparisons": 2,
        "accuracy": 0.5,
    }
    # Without comparison ids the sample pairs group the votes the same way here.
    assert majority_agreement(model, pairset(rewards, pairs)) == {"comparisons": 2, "accuracy": 0.5}
    # Vote weights count: with the dissenting vote of comparison 1 weighing 3, sample 1 is the majority.
    weighted = pairset(rewards, pairs, comparison=comparison, weight=[1, 1, 3, 1, 1, 1, 1, 1])
    assert majority_agreement(model, weighted) == {"comparisons": 2, "accuracy": 0.0}
