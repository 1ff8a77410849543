"""Known truth (1): simulated annotators who follow a known preference label a project through the
REST API in stages; after each stage a real reward job (a Bradley-Terry head on the built-in
encoder, default settings) trains on everything said so far, and the model's accuracy against the
TRUE preference rises with the labels.

The truth is closeness of the mean colour to purple (``color:#8040c0``) over swatches of random
colours (each channel 40..215, pixel noise on top). The target sits inside the range of every
channel, off-centre: a direction in colour space that is neither brightness nor one channel, and not
linear, so a handful of labels does not pin it down (brightness did: 14 labels gave 0.944, as good as
76). Accuracy is measured on a fixed held-out set: 80 swatches that are never uploaded, all 3160 of
their pairs, the truth computed by the preference itself from the pixels and the model's scores by
``RewardFunction.from_pretrained`` on the saved version (as the RL trainers call it). Nothing there
depends on sample ids or on the order of labeling.

Measured, run alone: 0.662 after 8 labels, 0.880 after 24 and 0.875 after 120 (two annotators, 5%
noise: 9 of the 120 verdicts flipped). Each job holds out ~5% of the comparisons by a hash of the
ids, so the figures move with the ids (with the tests that ran before): over nine id layouts
0.63..0.68, 0.87..0.88 and 0.87..0.88; replaying 16 hold-out patterns offline on the same labels,
0.63..0.69, 0.85..0.89 and 0.87..0.88. A linear head on the built-in encoder tops out near 0.88
here (a distance is not linear in the features), and how soon it gets there depends on which
verdicts the noise flipped (another set of flips gave 0.66, 0.82, 0.87), so the middle stage is
not asserted. Over eight other draws of the swatches and pairs (offline, same features and
trainer) the curve is 0.70 -> 0.78 -> 0.85 on average after 8, 24 and 80 labels, but 8 labels gave
anything from 0.53 to 0.82: what a few labels teach depends on which pairs they were, hence one
fixed draw here."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotate import services
from annotate.models import Judgment
from rewards import services as reward_services
from rewards.ml.reward_fn import RewardFunction
from rewards.models import RewardModelVersion
from simulate import annotators as sim
from simulate.services import simulated_annotators_ensure

pytestmark = pytest.mark.django_db

TRUTH = "color:#8040c0"
PROMPT = "a swatch"
POOL = 64  # swatches in the project, the only ones ever compared
HELD = 80  # swatches never uploaded: the held-out set, all 3160 pairs
STAGES = (8, 24, 120)  # labels so far, cumulative, by the same two annotators


def _swatch(seed: int) -> Image.Image:
    """A 32x32 swatch of a random colour (each channel 40..215) with pixel noise (sd 24)."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(40, 216, size=3)
    return Image.fromarray(np.clip(colour + rng.normal(0, 24, (32, 32, 3)), 0, 255).astype(np.uint8), "RGB")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _accuracy(predicted: list[float], truth: list[float]) -> float:
    """Share of the pairs (those the truth does not tie) that the model orders as the truth does."""
    n = len(truth)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if truth[i] != truth[j]]
    return sum((predicted[i] > predicted[j]) == (truth[i] > truth[j]) for i, j in pairs) / len(pairs)


def test_accuracy_against_the_truth_rises_with_labels(make_project: Any, manager: Any, settings: Any) -> None:
    # The launch minimums (10 training pairs, 1 held-out pair) keep people from training on next to
    # nothing; here training on next to nothing is the point, measured on the held-out swatches.
    settings.RL_REWARD_MIN_PAIRS = 5
    settings.RL_REWARD_MIN_HOLDOUT_PAIRS = 0
    p = make_project("truth", modality="image")
    ids = [
        services.sample_create_media(
            project=p, actor=manager, file=io.BytesIO(_png(_swatch(i))), filename=f"s{i}.png", prompt=PROMPT
        ).sample.id
        for i in range(POOL)
    ]
    preference = sim.preference_from_spec(TRUTH)
    held = [_swatch(10_000 + i) for i in range(HELD)]
    truth = preference.scores([PROMPT] * HELD, [sim.Output("image", image=im) for im in held])
    pairs = [(a, b) for a in range(POOL) for b in range(a + 1, POOL)]
    random.Random(0).shuffle(pairs)
    annotators = [
        sim.SimulatedAnnotator(sim.DjangoClient(token), p.slug, sim.Profile(preference, noise=0.05, seed=k))
        for k, (_, token) in enumerate(simulated_annotators_ensure(project=p, actor=manager, count=2))
    ]
    accuracy: list[float] = []
    done = 0
    for labels in STAGES:
        services.comparisons_create(
            project=p, actor=manager, specs=[{"samples": [ids[a], ids[b]]} for a, b in pairs[done:labels]]
        )
        # One after the other in this thread (the test's rows are not committed for other threads).
        first = (labels - done) // 2
        assert annotators[0].run(max_labels=first).labels == first
        assert annotators[1].run(max_labels=labels - done - first).labels == labels - done - first
        assert Judgment.objects.filter(project=p, source="simulated").count() == labels
        done = labels
        job = reward_services.reward_job_create(
            project=p,
            actor=manager,
            kind="bt",
            hyperparameters={"num_threads": 1},  # a tiny head: more threads only add overhead
            holdout=0.05,
            promote=False,
            dispatch=False,
        )
        job = reward_services.reward_job_run(job_id=job.id)
        assert job.status == "succeeded", job.error
        version = RewardModelVersion.objects.get(job=job)
        assert version.metrics["train_pairs"] + version.metrics["holdout_pairs"] == labels
        reward = RewardFunction.from_pretrained(version.path)
        accuracy.append(round(_accuracy(reward([PROMPT] * HELD, held), truth), 3))
    few, _, many = accuracy
    assert few < 0.75, accuracy  # 8 labels do not pin the truth down
    assert many >= 0.8 and many - few >= 0.12, accuracy  # 120 labels get most held-out pairs right
