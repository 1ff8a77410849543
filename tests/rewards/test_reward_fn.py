"""A reward model outside the app: ``RewardFunction.from_pretrained(version_dir)`` loads from the
version directory alone (no database) and gives the same rewards as the app's scoring."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotate import services as annotate_services
from annotate.models import Sample
from rewards import services
from rewards.ml.reward_fn import ENCODER_DIR, RewardFunction
from rewards.models import RewardModelVersion, SampleEmbedding, SampleScore
from tests.rewards.helpers import brighter, image_project, simulate
from tests.rewards.ml.tiny_models import save_tiny_bert, save_tiny_clip

pytestmark = pytest.mark.django_db


def _train_and_score(project: Any, manager: Any, encoder: Path, **kwargs: Any) -> RewardModelVersion:
    job = services.reward_job_create(
        project=project, actor=manager, encoder_path=str(encoder), dispatch=False, **kwargs
    )
    job = services.reward_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    version = RewardModelVersion.objects.get(job=job)
    services.version_score_samples(version_id=version.id)
    return version


def _moved(version: RewardModelVersion, tmp_path: Path) -> Path:
    # "From the directory alone": a copy somewhere else, and the encoder the app used gone from view.
    target = tmp_path / "elsewhere"
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(version.path, target)
    return target


def test_image_rewards_equal_the_app_scores(
    make_project: Any, manager: Any, annotator: Any, tmp_path: Path, django_assert_num_queries: Any
) -> None:
    clip = save_tiny_clip(tmp_path / "clip")
    project = image_project(make_project, manager, annotators=(annotator,), prompts=2, per_prompt=12)
    simulate(project, annotator, brighter, noise=0.05)
    version = _train_and_score(project, manager, clip, kind="bt", hyperparameters={"epochs": 20})
    assert (Path(version.path) / ENCODER_DIR / "config.json").is_file()
    directory = _moved(version, tmp_path)
    shutil.rmtree(clip)

    samples = list(Sample.objects.filter(project=project).select_related("prompt").order_by("id"))
    images = []
    for s in samples:
        with s.media.open("rb") as fh:
            images.append(Image.open(io.BytesIO(fh.read())).convert("RGB"))
    prompts = [s.prompt.text for s in samples]
    app = dict(SampleScore.objects.filter(version=version).values_list("sample_id", "reward"))
    with django_assert_num_queries(0):
        reward = RewardFunction.from_pretrained(directory)
        got = reward(prompts=prompts, completions=images)
    assert len(got) == len(samples) == 24
    assert all(isinstance(v, float) for v in got)
    np.testing.assert_allclose(got, [app[s.id] for s in samples], rtol=1e-5, atol=1e-5)
    # The same rewards through the diffusion trainers' spelling (outputs=), and the ordering of the
    # hidden rule survives: brighter images score higher on average.
    np.testing.assert_allclose(reward(prompts, outputs=images), got, rtol=1e-6, atol=1e-6)
    bright = np.array([s.metadata["brightness"] for s in samples])
    assert np.corrcoef(bright, got)[0, 1] > 0.5
    with pytest.raises(ValueError, match="2 prompts for 1 outputs"):
        reward(prompts=prompts[:2], completions=images[:1])


def test_text_rewards_equal_the_app_scores_as_a_trl_reward_function(
    make_project: Any, manager: Any, annotator: Any, tmp_path: Path, django_assert_num_queries: Any
) -> None:
    bert = save_tiny_bert(tmp_path / "bert")
    project = make_project("txt", modality="text", annotators=(annotator,))
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    items = [
        {"prompt": f"question {p}", "text": " ".join(words[: 1 + (i % 5)]) + f" {i}", "generator": "g"}
        for p in range(3)
        for i in range(10)
    ]
    annotate_services.sample_create_texts(project=project, actor=manager, items=items)
    annotate_services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=30, seed=1
    )
    simulate(project, annotator, lambda a, b: a.id if len(a.text) >= len(b.text) else b.id, noise=0.05)
    version = _train_and_score(project, manager, bert, kind="bt", hyperparameters={"epochs": 20})
    directory = _moved(version, tmp_path)

    samples = list(Sample.objects.filter(project=project).select_related("prompt").order_by("id"))
    app = dict(SampleScore.objects.filter(version=version).values_list("sample_id", "reward"))
    with django_assert_num_queries(0):
        reward = RewardFunction.from_pretrained(directory)
        # TRL calls reward_funcs with prompts=, completions= and the dataset's other columns.
        got = reward(
            prompts=[s.prompt.text for s in samples],
            completions=[s.text for s in samples],
            completion_ids=[[0]] * len(samples),
        )
        # Conversational completions are scored on their last assistant message.
        chat = reward(
            prompts=[[{"role": "user", "content": s.prompt.text}] for s in samples],
            completions=[[{"role": "assistant", "content": s.text}] for s in samples],
        )
    np.testing.assert_allclose(got, [app[s.id] for s in samples], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chat, got, rtol=1e-6, atol=1e-6)
    assert reward.__name__ == "rewardloop_bt"

    # Text heads read the response alone by default (measured better on HH-RLHF); prompt and text
    # together is one field away, and the cache keeps each form apart.
    assert reward.text_input == "response" and version.job.config["text_input"] == "response"
    cached = SampleEmbedding.objects.filter(encoder=version.encoder)
    assert set(cached.values_list("input", flat=True)) == {"response"}
    joint = _train_and_score(
        project,
        manager,
        bert,
        kind="bt",
        hyperparameters={"epochs": 20, "text_input": "joint"},
        promote=False,
    )
    assert cached.filter(input="joint").count() == cached.filter(input="response").count() == len(samples)
    app_joint = dict(SampleScore.objects.filter(version=joint).values_list("sample_id", "reward"))
    reward_joint = RewardFunction.from_pretrained(_moved(joint, tmp_path / "joint"))
    assert reward_joint.text_input == "joint"
    got_joint = reward_joint(prompts=[s.prompt.text for s in samples], completions=[s.text for s in samples])
    np.testing.assert_allclose(got_joint, [app_joint[s.id] for s in samples], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got_joint, got, atol=1e-3)

    # The text finetune kind (peft LoRA on the sentence encoder), end to end through the job.
    tuned = _train_and_score(
        project,
        manager,
        bert,
        kind="finetune",
        hyperparameters={"epochs": 2, "lr": 1e-3, "text_input": "joint", "max_length": 64},
        promote=False,
        device="cpu",
    )
    tuned_dir = Path(tuned.path)
    assert (tuned_dir / "adapter" / "adapter_config.json").is_file()
    assert tuned.metrics["holdout_accuracy"] is not None and tuned.metrics["baseline"] is not None
    app_tuned = dict(SampleScore.objects.filter(version=tuned).values_list("sample_id", "reward"))
    reward_tuned = RewardFunction.from_pretrained(_moved(tuned, tmp_path / "tuned"))
    assert reward_tuned.text_input == "joint"
    got_tuned = reward_tuned(prompts=[s.prompt.text for s in samples], completions=[s.text for s in samples])
    np.testing.assert_allclose(got_tuned, [app_tuned[s.id] for s in samples], rtol=1e-4, atol=1e-4)
