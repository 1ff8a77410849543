"""Offline jobs that learn from the pairs people judged, frozen in a snapshot at launch: text DPO
through TRL's DPOTrainer and Diffusion-DPO on a tiny SD-like pipeline; their checkpoints registered
as generator versions; a text job whose worker died resumes from TRL's last whole checkpoint (a
checkpoint cut short is never used nor registered); refusals with nothing stored."""

from __future__ import annotations

import math
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import pytest

from annotate.errors import Invalid
from annotate.models import DatasetSnapshot, GeneratorVersion
from tests.rewards.helpers import image_project
from tests.training.ml.test_ddpo import _pipeline_dir
from tests.training.ml.test_text_grpo import _policy
from training import services
from training.models import RLJob

pytestmark = pytest.mark.django_db


def _text_dpo(**kw: Any) -> dict[str, Any]:
    return {
        "policy": str(_policy()),
        "steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "max_length": 64,
        **kw,
    }


def test_a_text_dpo_job_learns_from_the_snapshot_and_registers_its_policy(
    text_project: Any, manager: Any
) -> None:
    job = services.rl_job_create(
        project=text_project, actor=manager, algorithm="text_dpo", config=_text_dpo(), dispatch=False
    )
    assert job.reward_version is None and job.snapshot is not None
    assert job.snapshot.spec["schema"] == "raw" and job.snapshot.status == "queued"
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert job.snapshot is not None and job.snapshot.status == "done" and (job.snapshot.row_count or 0) > 0
    assert [m["step"] for m in job.metrics] == [1.0, 2.0]
    assert job.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at first
    assert all("reward_parts/total" not in m for m in job.metrics)  # no reward model involved
    (version,) = GeneratorVersion.objects.filter(metadata__rl_job=job.id)
    assert version.name == f"job{job.id}-final" and version.metadata["kind"] == "causal_lm"


def test_a_text_job_whose_worker_died_resumes_from_the_last_whole_trl_checkpoint(
    text_project: Any, manager: Any
) -> None:
    job = services.rl_job_create(
        project=text_project, actor=manager, algorithm="text_dpo", config=_text_dpo(steps=3, checkpoint_every=1),
        dispatch=False,
    )  # fmt: skip
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    out = Path(job.output_dir)
    # The worker "died" during step 3 while TRL was writing checkpoint-3 (no trainer_state.json yet).
    shutil.rmtree(out / "final")
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    GeneratorVersion.objects.filter(metadata__rl_job=job.id).delete()
    RLJob.objects.filter(id=job.id).update(
        status="running", metrics=[*job.metrics[:2], {"step": 3.0, "loss": -1.0}]
    )
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    # Step 3 ran once more, from checkpoint-2; a restart from the base would have logged steps 1 and 2 again.
    assert [m["step"] for m in job.metrics] == [1.0, 2.0, 3.0] and job.metrics[2]["loss"] > 0
    names = sorted(GeneratorVersion.objects.filter(metadata__rl_job=job.id).values_list("name", flat=True))
    assert names == sorted(
        f"job{job.id}-{n}" for n in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "final")
    )


def test_a_text_grpo_job_resumes_through_trl_too(text_project: Any, manager: Any) -> None:
    config = {"policy": str(_policy()), "steps": 2, "prompts_per_step": 2, "num_generations": 2,
              "max_completion_length": 6, "checkpoint_every": 1}  # fmt: skip
    job = services.rl_job_create(
        project=text_project, actor=manager, algorithm="text_grpo", config=config, dispatch=False
    )
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    out = Path(job.output_dir)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-2")
    GeneratorVersion.objects.filter(metadata__rl_job=job.id).delete()
    RLJob.objects.filter(id=job.id).update(status="running")
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert [m["step"] for m in job.metrics] == [1.0, 2.0]  # step 1 kept, step 2 run again from checkpoint-1


def test_a_diffusion_dpo_job_learns_from_judged_images(project: Any, manager: Any) -> None:
    config = {"pipeline": str(_pipeline_dir()), "steps": 2, "batch_size": 2, "checkpoint_every": 1}
    job = services.rl_job_create(
        project=project, actor=manager, algorithm="diffusion_dpo", config=config, dispatch=False
    )
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert [m["step"] for m in job.metrics] == [1.0, 2.0]
    assert job.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    versions = GeneratorVersion.objects.filter(metadata__rl_job=job.id).order_by("id")
    assert [v.name for v in versions] == [f"job{job.id}-checkpoint-1", f"job{job.id}-checkpoint-2"]
    assert all(v.metadata["adapter"] and v.metadata["kind"] == "unet" for v in versions)


def test_offline_refusals_store_nothing(
    project: Any, text_project: Any, make_project: Any, manager: Any
) -> None:
    snapshots = DatasetSnapshot.objects.count()
    with pytest.raises(Invalid, match="text_dpo learns from judged pairs, not from a reward model") as exc:
        services.rl_job_create(
            project=text_project,
            actor=manager,
            algorithm="text_dpo",
            config=_text_dpo(),
            reward={},
            dispatch=False,
        )
    assert exc.value.code == "bad_reward"
    unjudged = image_project(
        make_project, manager, slug="unjudged", prompts=1, per_prompt=3, pairs_per_prompt=2
    )
    with pytest.raises(Invalid, match="no judgment with a winner between image samples yet") as exc:
        services.rl_job_create(
            project=unjudged, actor=manager, algorithm="diffusion_dpo",
            config={"pipeline": str(_pipeline_dir())}, dispatch=False,
        )  # fmt: skip
    assert exc.value.code == "no_pairs"
    with pytest.raises(Invalid, match="diffusion_dpo trains image generators") as exc:
        services.rl_job_create(
            project=text_project, actor=manager, algorithm="diffusion_dpo",
            config={"pipeline": str(_pipeline_dir())}, dispatch=False,
        )  # fmt: skip
    assert RLJob.objects.count() == 0 and DatasetSnapshot.objects.count() == snapshots


def test_a_mixed_project_learns_only_from_pairs_of_the_algorithms_modality(
    make_project: Any, manager: Any, annotator: Any
) -> None:
    import io

    from annotate import services as annotate_services
    from annotate.models import Judgment
    from tests.rewards.helpers import noise_png, simulate
    from training.services import jobs

    p = make_project("mixed", annotators=(annotator,))
    annotate_services.sample_create_texts(
        project=p, actor=manager,
        items=[{"prompt": "say it", "text": "word " * (1 + i), "generator": "g"} for i in range(4)],
    )  # fmt: skip
    for i in range(4):
        annotate_services.sample_create_media(
            project=p, actor=manager, file=io.BytesIO(noise_png(40 + 50 * i, i)), filename=f"{i}.png",
            prompt="draw it", metadata={"brightness": 40 + 50 * i},
        )  # fmt: skip
    annotate_services.comparisons_create_random_pairs(project=p, actor=manager, pairs_per_prompt=4, seed=0)

    def rule(a: Any, b: Any) -> int:
        if a.modality == "text":
            return int(a.id if len(a.text) >= len(b.text) else b.id)
        return int(a.id if a.metadata["brightness"] >= b.metadata["brightness"] else b.id)

    simulate(p, annotator, rule, noise=0.0)
    text_judged = Judgment.objects.filter(project=p, comparison__prompt__text="say it").count()
    assert text_judged == 4 and Judgment.objects.filter(project=p).count() == 8
    job = services.rl_job_create(
        project=p, actor=manager, algorithm="text_dpo", config=_text_dpo(), dispatch=False
    )
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    pairs = jobs._judged_pairs(job, "text")
    assert len(pairs) == text_judged and all(p == "say it" for p, _, _ in pairs)
    assert all(len(chosen) > len(rejected) > 0 for _, chosen, rejected in pairs)  # longer won, as judged
