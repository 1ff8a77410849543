"""Projects with an active reward model, shared by the job tests: an image project judged
"brighter wins" on a tiny CLIP, a text project judged "longer wins" on a tiny BERT."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import pytest

from rewards import services as reward_services
from rewards.models import RewardModelVersion
from tests.rewards.helpers import brighter, image_project, simulate
from tests.rewards.ml.tiny_models import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: Any) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def project(make_project: Any, manager: Any, annotator: Any, clip_dir: Path) -> Any:
    p = image_project(
        make_project, manager, annotators=(annotator,), prompts=2, per_prompt=8, pairs_per_prompt=20
    )
    simulate(p, annotator, brighter)
    job = reward_services.reward_job_create(
        project=p,
        actor=manager,
        kind="bt",
        encoder_path=str(clip_dir),
        hyperparameters={"epochs": 5},
        dispatch=False,
    )
    job = reward_services.reward_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert RewardModelVersion.objects.filter(project=p, is_active=True).exists()
    return p


@pytest.fixture
def text_project(make_project: Any, manager: Any, annotator: Any, tmp_path: Path) -> Any:
    from annotate import services as annotate_services
    from tests.rewards.ml.tiny_models import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")
    project = make_project("txt", modality="text", annotators=(annotator,))
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    items = [
        {"prompt": f"question {p}", "text": " ".join(words[: 1 + (i % 5)]) + f" {i}", "generator": "g"}
        for p in range(2)
        for i in range(8)
    ]
    annotate_services.sample_create_texts(project=project, actor=manager, items=items)
    annotate_services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=20, seed=1
    )
    simulate(project, annotator, lambda a, b: a.id if len(a.text) >= len(b.text) else b.id, noise=0.05)
    job = reward_services.reward_job_create(
        project=project,
        actor=manager,
        kind="bt",
        encoder_path=str(bert),
        hyperparameters={"epochs": 5},
        dispatch=False,
    )
    assert reward_services.reward_job_run(job_id=job.id).status == "succeeded"
    return project


@pytest.fixture
def video_project(make_project: Any, manager: Any, annotator: Any, clip_dir: Path) -> Any:
    """Eight short clips judged "the older upload wins", a BT reward model on 4 frames of each."""
    import io

    from django.test import override_settings

    from annotate import services as annotate_services
    from rewards.models import RewardConfig
    from tests.factories import mp4_bytes

    p = make_project("vid", modality="video", annotators=(annotator,))
    for i in range(8):
        annotate_services.sample_create_media(
            project=p,
            actor=manager,
            file=io.BytesIO(mp4_bytes(frames=6 + i, seed=i)),
            filename=f"{i}.mp4",
            prompt=f"a clip {i % 2}",
        )
    annotate_services.comparisons_create_random_pairs(project=p, actor=manager, pairs_per_prompt=12, seed=0)
    simulate(p, annotator, lambda a, b: min(a.id, b.id))
    with override_settings(RL_REWARD_MIN_PAIRS=5):
        RewardConfig.objects.update_or_create(project=p, defaults={"video_frames": 4})
        job = reward_services.reward_job_create(
            project=p, actor=manager, kind="bt", encoder_path=str(clip_dir), hyperparameters={"epochs": 3},
            dispatch=False,
        )  # fmt: skip
        job = reward_services.reward_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    return p
