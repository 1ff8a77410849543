"""The loop end to end with a known truth, on CPU in under a minute each: simulated annotators who
prefer brighter images judge through the REST API; the loop trains a reward model on their
verdicts, runs a DDPO round on a tiny SD-like pipeline with it, renders the new version against the
base on the same prompts and seeds, and simulated annotators judge those.

- When the round's judges hold the same truth, the new version is truly brighter, people prefer
  it, the round is evaluated and the leaderboard ranks it above the base.
- When the reward model is hackable (it learned brightness from a labeling pool whose taste the
  true judges do not share: they prefer darker images), the round's version is truly worse, the
  guard flags it and stops the loop, and the base stays the incumbent (the deployed truth never
  drops)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotate import selectors
from annotate.models import Sample
from rewards import services as reward_services
from simulate import annotators as sim
from simulate.services import simulated_annotators_ensure
from tests.rewards.helpers import image_project
from tests.training.ml.test_ddpo import _pipeline_dir
from training import services
from training.models import LoopConfig, LoopRound, SamplingJob
from training.services import sampling as sampling_services

pytestmark = pytest.mark.django_db

DDPO = {
    "iterations": 12, "prompts_per_iteration": 4, "images_per_prompt": 16, "train_batch_size": 32,
    "sample_steps": 4, "resolution": 8, "inner_epochs": 2, "learning_rate": 1e-2, "clip_range": 0.2,
    "guidance_scale": 1.0, "lora_rank": 8, "lora_alpha": 16,
    "lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv_out"],
}  # fmt: skip


def _brightness(sample: Sample) -> float:
    with Image.open(sample.media.path) as im:
        return float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0)


@pytest.mark.parametrize("truth", ["brightness", "color:#000000"])
def test_a_round_against_the_truth(make_project: Any, manager: Any, clip_dir: Path, truth: str) -> None:
    p = image_project(make_project, manager, prompts=2, per_prompt=8, pairs_per_prompt=20, overlap=1)
    ((_, token),) = simulated_annotators_ensure(project=p, actor=manager, count=1)
    judge = sim.SimulatedAnnotator(sim.DjangoClient(token), p.slug, sim.Profile(sim.Brightness(), noise=0.05))
    services.loop_config_set(
        project=p, actor=manager, algorithm="ddpo", rl_config={"pipeline": str(_pipeline_dir()), **DDPO},
        feedback={"prompts": 2, "within_pairs": 0, "render": {"per_prompt": 4, "steps": 4, "guidance_scale": 1.0,
                                                               "resolution": 16}},
        encoder_path=str(clip_dir), reward_hyperparameters={"epochs": 5}, retrain_after=30, verdicts_needed=8,
        max_rounds=1,
    )  # fmt: skip

    def tick() -> LoopRound:
        r = services.loop_tick(project_id=p.id, dispatch=False)
        assert r is not None
        return r

    tick()
    assert judge.run(max_labels=30).labels == 30
    r = tick()
    assert r.state == "reward_training" and r.reward_job_id is not None, r.reason
    assert reward_services.reward_job_run(job_id=r.reward_job_id).status == "succeeded"
    r = tick()
    assert r.state == "rl" and r.rl_job_id is not None, r.reason
    rl = services.rl_job_run(job_id=r.rl_job_id)
    assert rl.status == "succeeded", rl.error
    r = tick()
    sampling_id = r.sampling_job_id
    assert sampling_id is not None, r.reason
    assert services.sampling_job_render(job_id=sampling_id).status == "rendered"
    assert sampling_services.sampling_job_queue(job_id=sampling_id).status == "succeeded"
    assert tick().state == "awaiting_verdicts"
    job = SamplingJob.objects.get(id=sampling_id)  # rendered since the round read it
    new = {int(s) for _, _, s in job.outputs["new"]}
    old = {int(s) for _, _, s in job.outputs["incumbent"]}
    bright_new = np.mean([_brightness(s) for s in Sample.objects.filter(id__in=new)])
    bright_old = np.mean([_brightness(s) for s in Sample.objects.filter(id__in=old)])
    assert bright_new > bright_old  # the generator moved toward what the reward model learned
    ((_, token2),) = simulated_annotators_ensure(project=p, actor=manager, count=1, prefix="truth")
    truth_judge = sim.SimulatedAnnotator(
        sim.DjangoClient(token2), p.slug, sim.Profile(sim.preference_from_spec(truth), noise=0.05)
    )
    truth_judge.run()  # the round's judges: new version against the base
    r = tick()
    assert r.verdicts >= 8 and r.human_win_rate is not None
    board = [row["name"] for row in selectors.leaderboard(project=p, rounds=50)]
    assert r.new_version is not None and r.incumbent is not None
    if truth == "brightness":  # the truth the reward model learned: a real improvement
        assert r.state == "evaluated" and r.human_win_rate > 0.5, r.reason
        assert board.index(r.new_version.name) < board.index(r.incumbent.name)
    else:  # a hacked reward: truly worse (brighter, where darker is wanted), flagged, loop stopped
        assert r.state == "flagged" and r.human_win_rate < 0.5, r.reason
        assert "reward hacking suspected" in r.reason
        assert LoopConfig.objects.get(project=p).enabled is False
        assert board.index(r.incumbent.name) < board.index(r.new_version.name)
