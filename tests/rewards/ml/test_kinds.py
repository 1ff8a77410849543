"""The reward-model kinds on synthetic cached features: configs, training, saving, learning. No database."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from rewards.ml.data import A_WINS, B_WINS, BOTH_BAD, MISSING, TIE, PairSet
from rewards.ml.heads import decisive_logit, outcome_log_probs, pair_targets
from rewards.ml.kinds import CONFIGS, KINDS, TRAINERS, load_reward_model
from rewards.ml.metrics import evaluate
from rewards.ml.model import RewardModel
from rewards.ml.progress import ConfigError, Progress, TrainingCancelled
from tests.rewards.ml import synthetic as syn
from tests.rewards.ml.synthetic import Synthetic, gold_accuracy

# Small runs: 32-d features, a few thousand pairs, well under a second each.
FAST = {"epochs": 2, "min_steps": 0, "batch_size": 512}


def fit(kind: str, data: Synthetic, **overrides: Any) -> RewardModel:
    config = CONFIGS[kind](**overrides)
    return TRAINERS[kind](config, data.train, holdout=data.holdout)


@pytest.fixture(scope="module")
def prompted() -> Synthetic:
    return syn.make(n_prompts=40, seed=1)


@pytest.fixture(scope="module")
def plain() -> Synthetic:
    return syn.make(seed=2)


@pytest.fixture(scope="module")
def with_aspects() -> Synthetic:
    return syn.make(aspects=2, seed=3)


@pytest.fixture(scope="module")
def flagged() -> Synthetic:
    return syn.make(artifact=True, n_samples=3000, seed=4)


@pytest.fixture(scope="module")
def video() -> Synthetic:
    return syn.make_video(seed=5)


def data_for(kind: str, request: pytest.FixtureRequest) -> Synthetic:
    name = {"bt": "prompted", "ensemble": "prompted", "aspects": "with_aspects", "artifact": "flagged"}[kind]
    data: Synthetic = request.getfixturevalue(name)
    return data


def samples(pairs: PairSet, n: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    prompt = None if pairs.prompt is None else pairs.prompt[:n]
    return pairs.x[:n], pairs.mask[:n], prompt


# --- smoke, save/load --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_smoke_shapes_and_save_load(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    data = data_for(kind, request)
    model = fit(kind, data, **FAST)
    assert isinstance(model, KINDS[kind]) and model.kind == kind
    x, mask, prompt = samples(data.train)
    out = model.score(x, mask, prompt)
    assert out.reward.shape == (50,) and np.isfinite(out.reward).all()
    assert (out.uncertainty is not None) == (kind == "ensemble")
    assert (out.artifact_prob is not None) == (kind == "artifact")
    if out.uncertainty is not None:
        assert out.uncertainty.shape == (50,) and (out.uncertainty >= 0).all()
    if out.artifact_prob is not None:
        assert ((out.artifact_prob >= 0) & (out.artifact_prob <= 1)).all()
        np.testing.assert_allclose(
            out.reward, -np.log(out.artifact_prob / (1 - out.artifact_prob)), atol=1e-4
        )
    assert sorted(out.aspects) == (["aspect0", "aspect1"] if kind == "aspects" else [])
    for values in out.aspects.values():
        assert values.shape == (50,)
    probs = model.prob_first_wins(data.holdout)
    assert probs.shape == (data.holdout.num_pairs,) and ((probs >= 0) & (probs <= 1)).all()
    assert model.curves and model.curves[0]["step"] == 1
    assert "holdout_accuracy" in model.curves[-1]

    model.save_pretrained(tmp_path / "m", extra={"version": 7})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["kind"] == kind and meta["format_version"] == 1
    assert meta["config"] == model.config
    assert set(meta["config"]) == {f.name for f in dataclasses.fields(CONFIGS[kind])}
    assert (meta["dim"], meta["k"], meta["prompt_conditioned"]) == (
        32,
        1,
        prompt is not None and kind != "artifact",
    )
    assert meta["curves"] and meta["extra"] == {"version": 7}
    if kind == "aspects":
        assert meta["config"]["aspects"] == ["aspect0", "aspect1"]  # resolved from the data
    # Plain safetensors reads the weights.
    state = safetensors.torch.load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(state) == set(model.state_dict())

    loaded = load_reward_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.extra == {"version": 7} and loaded.curves == meta["curves"]
    again = loaded.score(x, mask, prompt)
    np.testing.assert_allclose(again.reward, out.reward, atol=1e-6)
    if out.uncertainty is not None:
        assert again.uncertainty is not None
        np.testing.assert_allclose(again.uncertainty, out.uncertainty, atol=1e-6)
    for key, values in out.aspects.items():
        np.testing.assert_allclose(again.aspects[key], values, atol=1e-6)
    np.testing.assert_allclose(loaded.prob_first_wins(data.holdout), probs, atol=1e-6)


def test_save_load_attention_pooling_video(video: Synthetic, tmp_path: Path) -> None:
    model = fit("bt", video, pooling="attention", **FAST)
    assert model.k == 4
    model.save_pretrained(tmp_path)
    loaded = load_reward_model(tmp_path)
    x, mask, _ = samples(video.train)
    assert not mask.all()  # some videos are padded
    np.testing.assert_allclose(
        loaded.score(x, mask, None).reward, model.score(x, mask, None).reward, atol=1e-6
    )


def test_load_refuses_what_is_not_a_reward_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_reward_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "unicorn", "format_version": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unicorn"):
        load_reward_model(tmp_path)


def test_score_rejects_bad_inputs(prompted: Synthetic) -> None:
    model = fit("bt", prompted, **FAST)
    x, mask, prompt = samples(prompted.train, 5)
    with pytest.raises(ValueError, match="prompt-conditioned"):
        model.score(x, mask, None)
    with pytest.raises(ValueError, match="shape"):
        model.score(x[:, :, :16], mask, prompt)
    with pytest.raises(ValueError, match="unmasked"):
        model.score(x, np.zeros_like(mask), prompt)


# --- learning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", ["davidson", "rao_kupper", "none"])
def test_bt_learns_the_gold_rule(plain: Synthetic, ties: str) -> None:
    model = fit("bt", plain, ties=ties)
    assert gold_accuracy(model.prob_first_wins(plain.holdout), plain.holdout, plain.gold) >= 0.9
    assert model.curves[-1]["holdout_accuracy"] >= 0.8  # against the noisy labels (10% flipped)


def test_bt_learns_a_prompt_dependent_rule(prompted: Synthetic) -> None:
    model = fit("bt", prompted)
    assert model.prompt_conditioned
    assert gold_accuracy(model.prob_first_wins(prompted.holdout), prompted.holdout, prompted.gold) >= 0.9
    unconditioned = fit("bt", prompted, use_prompt=False)
    assert not unconditioned.prompt_conditioned
    acc = gold_accuracy(unconditioned.prob_first_wins(prompted.holdout), prompted.holdout, prompted.gold)
    assert acc < 0.85


def test_aspects_each_head_follows_its_own_aspect(with_aspects: Synthetic) -> None:
    model = fit("aspects", with_aspects)
    holdout = with_aspects.holdout
    assert model.aspect_names == ["aspect0", "aspect1"]
    for key, gold in with_aspects.aspect_gold.items():
        own = gold_accuracy(model.prob_first_wins(holdout, aspect=key), holdout, gold)
        overall = gold_accuracy(model.prob_first_wins(holdout), holdout, gold)
        assert own >= 0.88
        assert own > overall + 0.08
    # The overall head follows the overall gold (the sum of the aspects).
    assert gold_accuracy(model.prob_first_wins(holdout), holdout, with_aspects.gold) >= 0.88
    metrics = evaluate(model, holdout)
    assert set(metrics["aspect_accuracy"]) == {"aspect0", "aspect1"}
    assert all(v >= 0.8 for v in metrics["aspect_accuracy"].values())


def test_aspects_listed_in_config_and_unknown_aspect(with_aspects: Synthetic) -> None:
    model = fit("aspects", with_aspects, aspects=["aspect1"], **FAST)
    assert model.aspect_names == ["aspect1"] and model.n_heads == 2
    with pytest.raises(ValueError, match="not in the training data"):
        fit("aspects", with_aspects, aspects=["nope"], **FAST)


def test_ensemble_learns_and_is_unsure_out_of_distribution() -> None:
    data = syn.make(subspace=8, seed=6)
    model = fit("ensemble", data)
    assert model.scorer.out_weight.shape[0] == 5  # one stacked module, not five
    assert gold_accuracy(model.prob_first_wins(data.holdout), data.holdout, data.gold) >= 0.85
    x, mask, _ = samples(data.train, 300)
    rng = np.random.default_rng(0)
    ood = rng.normal(size=(300, 1, 32))
    ood[..., :8] = 0.0
    ood = syn.unit(ood)
    seen = model.score(x, mask, None).uncertainty
    unseen = model.score(ood, None, None).uncertainty
    assert seen is not None and unseen is not None
    assert unseen.mean() > 3 * seen.mean()
    spread = model.pair_uncertainty(data.holdout)
    assert spread is not None and spread.shape == (data.holdout.num_pairs,)
    out = model.score(x, mask, None)
    assert out.uncertainty is not None
    np.testing.assert_allclose(
        model.conservative_reward(x, mask, None, 2.0), out.reward - 2.0 * out.uncertainty
    )


def test_non_ensembles_conservative_reward_is_the_reward(plain: Synthetic) -> None:
    model = fit("bt", plain, **FAST)
    x, mask, _ = samples(plain.train)
    np.testing.assert_array_equal(
        model.conservative_reward(x, mask, None, 3.0), model.score(x, mask, None).reward
    )
    assert model.pair_uncertainty(plain.holdout) is None


def test_artifact_classifier(flagged: Synthetic) -> None:
    model = fit("artifact", flagged)
    metrics = evaluate(model, flagged.holdout)
    labels = flagged.holdout.artifact
    assert labels is not None
    assert metrics["artifact_samples"] == int(np.count_nonzero(labels >= 0)) > 0
    assert metrics["artifact_auc"] >= 0.9
    # Class-balanced training trades some plain accuracy (75% of samples are clean) for the rare class.
    assert metrics["artifact_accuracy"] >= 0.8
    assert model.curves[-1]["holdout_artifact_auc"] == metrics["artifact_auc"]


def test_artifact_needs_both_classes(flagged: Synthetic) -> None:
    one_class = dataclasses.replace(flagged.train, artifact=np.zeros_like(flagged.train.artifact))
    with pytest.raises(ValueError, match="both flagged and clean"):
        TRAINERS["artifact"](CONFIGS["artifact"](**FAST), one_class)


def test_attention_pooling_finds_the_key_frame(video: Synthetic) -> None:
    attention = fit("bt", video, pooling="attention")
    mean = fit("bt", video, pooling="mean")
    acc_attention = gold_accuracy(attention.prob_first_wins(video.holdout), video.holdout, video.gold)
    acc_mean = gold_accuracy(mean.prob_first_wins(video.holdout), video.holdout, video.gold)
    assert acc_attention >= 0.85
    assert acc_attention > acc_mean + 0.2


# --- ties and both-bad --------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", ["davidson", "rao_kupper"])
def test_predicted_tie_rate_matches_the_data(ties: str) -> None:
    data = syn.make(tie_rate=0.3, seed=7)
    model = fit("bt", data, ties=ties)
    metrics = evaluate(model, data.holdout)
    assert metrics["tie_rate"] == pytest.approx(0.3, abs=0.05)
    tie_prob = model.outcome_probs(data.holdout)[:, 1]
    assert abs(float(tie_prob.mean()) - metrics["tie_rate"]) <= 0.1
    assert metrics["predicted_tie_rate"] == pytest.approx(float(tie_prob.mean()), abs=0.02)


@pytest.mark.parametrize("ties", ["davidson", "rao_kupper", "none"])
def test_outcome_probabilities_sum_to_one(ties: str) -> None:
    d = torch.linspace(-8, 8, 33, dtype=torch.float64)
    tie_param = torch.tensor(-0.7, dtype=torch.float64)
    lp_a, lp_t, lp_b = outcome_log_probs(d, tie_param, ties)
    total = lp_a.exp() + lp_b.exp() + (lp_t.exp() if ties != "none" else 0.0)
    torch.testing.assert_close(total, torch.ones_like(d))
    pi_a, pi_b = d.exp(), torch.ones_like(d)
    if ties == "davidson":
        nu = math.exp(-0.7)
        denom = pi_a + pi_b + nu * (pi_a * pi_b).sqrt()
        torch.testing.assert_close(lp_a.exp(), pi_a / denom)
        torch.testing.assert_close(lp_t.exp(), nu * (pi_a * pi_b).sqrt() / denom)
    if ties == "rao_kupper":
        theta = 1 + math.exp(-0.7)
        torch.testing.assert_close(lp_a.exp(), pi_a / (pi_a + theta * pi_b))
        tie = (theta**2 - 1) * pi_a * pi_b / ((pi_a + theta * pi_b) * (pi_b + theta * pi_a))
        torch.testing.assert_close(lp_t.exp(), tie)
    # Decisive probability: P(a>b) / (P(a>b) + P(b>a)).
    conditional = torch.sigmoid(decisive_logit(d, tie_param, ties))
    torch.testing.assert_close(conditional, lp_a.exp() / (lp_a.exp() + lp_b.exp()))
    # Extreme differences stay finite.
    extreme = outcome_log_probs(torch.tensor([-1e4, 1e4], dtype=torch.float64), tie_param, ties)
    assert all(torch.isfinite(t).all() for t in extreme)


def test_pair_targets_both_bad_and_ties() -> None:
    outcome = np.array([A_WINS, B_WINS, TIE, BOTH_BAD, MISSING], dtype=np.int8)
    weight = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    target, w = pair_targets(outcome, weight, ties="davidson", both_bad="drop")
    assert target.tolist() == [1, -1, 0, 0, 0] and w.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]
    _, w = pair_targets(outcome, weight, ties="davidson", both_bad="tie")
    assert w.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]
    _, w = pair_targets(outcome, weight, ties="none", both_bad="drop")
    assert w.tolist() == [1.0, 2.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown outcome"):
        pair_targets(np.array([5], dtype=np.int8), weight[:1], ties="davidson", both_bad="drop")


def test_both_bad_as_tie_raises_the_tie_rate(plain: Synthetic) -> None:
    # Relabel a third of the pairs "both bad": dropped they change nothing about ties; as ties they do.
    outcome = plain.train.outcome.copy()
    outcome[::3] = BOTH_BAD
    data = dataclasses.replace(plain, train=dataclasses.replace(plain.train, outcome=outcome))
    dropped = fit("bt", data, both_bad="drop", **FAST)
    as_tie = fit("bt", data, both_bad="tie", **FAST)
    tie_dropped = dropped.outcome_probs(plain.holdout)[:, 1].mean()
    tie_kept = as_tie.outcome_probs(plain.holdout)[:, 1].mean()
    assert tie_dropped < 0.05 and tie_kept > 0.2


def test_no_trainable_pairs_is_an_error(plain: Synthetic) -> None:
    outcome = np.full_like(plain.train.outcome, BOTH_BAD)
    with pytest.raises(ValueError, match="no pairs"):
        TRAINERS["bt"](CONFIGS["bt"](**FAST), dataclasses.replace(plain.train, outcome=outcome))


# --- progress and cancellation -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_cancel_at_step_3(kind: str, request: pytest.FixtureRequest) -> None:
    data = data_for(kind, request)
    seen: list[int] = []
    cancel = TrainingCancelled("stop")

    def progress(p: Progress) -> None:
        seen.append(p.step)
        if p.step == 3:
            raise cancel

    config = CONFIGS[kind](log_every_steps=1, batch_size=64, **{"epochs": 2, "min_steps": 0})
    with pytest.raises(TrainingCancelled) as raised:
        TRAINERS[kind](config, data.train, holdout=data.holdout, progress=progress)
    assert raised.value is cancel
    assert seen == [1, 2, 3]


def test_progress_reports(plain: Synthetic) -> None:
    reports: list[Progress] = []
    model = TRAINERS["bt"](
        CONFIGS["bt"](epochs=3, min_steps=0, batch_size=1000),
        plain.train,
        holdout=plain.holdout,
        progress=reports.append,
    )
    assert reports[0].step == 1 and reports[-1].step == reports[-1].total_steps == 18
    assert [r.epoch for r in reports if r.metrics] == [1, 2, 3]  # each epoch end carries holdout metrics
    assert all(r.epochs == 3 and r.elapsed_s >= 0 and r.eta_s >= 0 and math.isfinite(r.loss) for r in reports)
    end = reports[-1]
    assert end.metrics["holdout_pairs"] == int(np.isin(plain.holdout.outcome, (A_WINS, B_WINS)).sum())
    assert end.eta_s == 0
    assert len(model.curves) == len(reports)


def test_min_steps_gives_small_data_more_epochs(plain: Synthetic) -> None:
    reports: list[Progress] = []
    TRAINERS["bt"](
        CONFIGS["bt"](epochs=1, min_steps=40, batch_size=1000), plain.train, progress=reports.append
    )
    assert reports[-1].epochs == 7 and reports[-1].total_steps == 42


# --- determinism --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bt", "ensemble"])
def test_same_seed_same_scores(kind: str, prompted: Synthetic) -> None:
    x, mask, prompt = samples(prompted.train)
    first = fit(kind, prompted, seed=11, **FAST).score(x, mask, prompt).reward
    second = fit(kind, prompted, seed=11, **FAST).score(x, mask, prompt).reward
    other = fit(kind, prompted, seed=12, **FAST).score(x, mask, prompt).reward
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_float64_and_hidden_layers(plain: Synthetic, tmp_path: Path) -> None:
    model = fit("bt", plain, dtype="float64", hidden=16, hidden_layers=2, dropout=0.1, **FAST)
    assert next(model.parameters()).dtype == torch.float64
    model.save_pretrained(tmp_path)
    loaded = load_reward_model(tmp_path)
    x, mask, _ = samples(plain.train)
    assert next(loaded.parameters()).dtype == torch.float64
    np.testing.assert_array_equal(loaded.score(x, mask, None).reward, model.score(x, mask, None).reward)


# --- configs ------------------------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, Any]] = [
    ("lr", 0.0),
    ("lr", -1e-3),
    ("lr", float("nan")),
    ("epochs", 0),
    ("epochs", 1001),
    ("epochs", "5"),
    ("epochs", True),
    ("min_steps", -1),
    ("batch_size", 0),
    ("weight_decay", -0.1),
    ("hidden", -1),
    ("hidden_layers", 0),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("pooling", "max"),
    ("use_prompt", "yes"),
    ("ties", "gaussian"),
    ("both_bad", "maybe"),
    ("seed", -1),
    ("device", "tpu"),
    ("dtype", "float16"),
    ("num_threads", 0),
    ("log_every_steps", 0),
    ("n_members", 1),
    ("n_members", 65),
    ("aspects", []),
    ("aspects", ["x", "x"]),
    ("aspects", ["overall"]),
]
CASES = [
    (kind, field, value)
    for kind in sorted(CONFIGS)
    for field, value in BAD_VALUES
    if field in {f.name for f in dataclasses.fields(CONFIGS[kind])}
]


@pytest.mark.parametrize(("kind", "field", "value"), CASES)
def test_config_rejects_bad_value(kind: str, field: str, value: Any) -> None:
    config = CONFIGS[kind](**{field: value})
    with pytest.raises(ConfigError) as raised:
        config.validate()
    assert raised.value.field == field
    with pytest.raises(ConfigError):
        CONFIGS[kind].from_dict({field: value})


@pytest.mark.parametrize("kind", ["bt", "aspects", "ensemble"])
def test_both_bad_tie_needs_a_tie_model(kind: str) -> None:
    with pytest.raises(ConfigError) as raised:
        CONFIGS[kind](ties="none", both_bad="tie").validate()
    assert raised.value.field == "both_bad"


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_config_round_trip_and_unknown_keys(kind: str) -> None:
    config = CONFIGS[kind](epochs=7, lr=0.01)
    data = json.loads(json.dumps(config.to_dict()))
    assert CONFIGS[kind].from_dict(data) == config
    assert CONFIGS[kind].from_dict({}) == CONFIGS[kind]()
    with pytest.raises(ConfigError) as raised:
        CONFIGS[kind].from_dict({"epochs": 3, "bogus": 1, "other": 2})
    assert raised.value.field == "bogus, other"
    assert "bogus" in str(raised.value) and "other" in str(raised.value)
    # A trainer validates too: a config built without from_dict cannot slip through.
    with pytest.raises(ConfigError):
        TRAINERS[kind](CONFIGS[kind](lr=-1.0), syn.make(n_samples=30, n_pairs=20, n_holdout=5).train)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_config_error(plain: Synthetic) -> None:
    with pytest.raises(ConfigError) as raised:
        TRAINERS["bt"](CONFIGS["bt"](device="cuda", **FAST), plain.train)
    assert raised.value.field == "device"
