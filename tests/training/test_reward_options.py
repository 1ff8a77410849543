"""How an RL job's reward is made: a chosen reward model, an ensemble's conservative
``mean - k * std`` and an artifact classifier's penalty, each part on the job's per-step metrics;
every bad choice refused at launch (service and REST) with nothing stored."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import pytest

from annotate.errors import Invalid
from rewards import services as reward_services
from rewards.models import RewardModelVersion
from tests.rewards.helpers import brighter, image_project, simulate
from tests.training.test_jobs import _config
from training import services
from training.models import RLJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions(make_project: Any, manager: Any, annotator: Any, clip_dir: Path) -> dict[str, Any]:
    """An image project judged "brighter wins", the darker half flagged as broken, with a BT head
    (active), a 3-member ensemble and an artifact classifier trained on the same judgments."""
    p = image_project(
        make_project, manager, annotators=(annotator,), prompts=2, per_prompt=8, pairs_per_prompt=20
    )
    simulate(p, annotator, brighter, artifacts=lambda s: s.metadata["brightness"] < 140)
    out: dict[str, Any] = {"project": p}
    for kind, hyper in (
        ("bt", {"epochs": 5}),
        ("ensemble", {"epochs": 5, "n_members": 3}),
        ("artifact", {"epochs": 20}),
    ):
        job = reward_services.reward_job_create(
            project=p,
            actor=manager,
            kind=kind,
            encoder_path=str(clip_dir),
            hyperparameters=hyper,
            dispatch=False,
        )
        job = reward_services.reward_job_run(job_id=job.id)
        assert job.status == "succeeded", job.error
        out[kind] = RewardModelVersion.objects.get(job=job)
    RewardModelVersion.objects.filter(project=p).update(is_active=False)
    RewardModelVersion.objects.filter(id=out["bt"].id).update(is_active=True)
    return out


def test_a_job_on_a_conservative_ensemble_with_an_artifact_penalty_logs_each_part(
    versions: dict[str, Any], manager: Any
) -> None:
    ens, art = versions["ensemble"], versions["artifact"]
    job = services.rl_job_create(
        project=versions["project"], actor=manager, algorithm="ddpo", config=_config(iterations=1),
        reward={"version": ens.number, "conservative_k": 1.5, "artifact_version": art.number, "artifact_weight": 2.0},
        dispatch=False,
    )  # fmt: skip
    assert (job.reward_version_id, job.artifact_version_id) == (ens.id, art.id)
    assert job.reward_options == {"conservative_k": 1.5, "artifact_weight": 2.0}
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    (row,) = job.metrics
    model, spread = row["reward_parts/model"], row["reward_parts/spread"]
    penalty, total = row["reward_parts/artifact_penalty"], row["reward_parts/total"]
    assert spread > 0 and penalty > 0  # the members disagree; some samples look broken
    assert total == pytest.approx(model - 1.5 * spread - penalty, abs=1e-9)
    assert row["reward_mean"] == pytest.approx(total, abs=1e-6)  # what DDPO trained on is the total


BAD_REWARDS: list[tuple[dict[str, Any], str]] = [
    ({"version": 99}, "reward.version: this project has no reward model version 99"),
    ({"version": "bt"}, "reward.version must be a reward model version number"),
    ({"version": True}, "reward.version must be a reward model version number"),
    ({"version": "<artifact>"}, "an artifact classifier is a penalty, not the reward"),
    ({"conservative_k": 1.0}, "reward.conservative_k needs an ensemble reward model"),
    (
        {"version": "<ensemble>", "conservative_k": 11},
        "reward.conservative_k must be a number >= 0 and <= 10",
    ),
    ({"version": "<ensemble>", "conservative_k": -0.5}, "reward.conservative_k must be a number"),
    ({"version": "<ensemble>", "conservative_k": "1"}, "reward.conservative_k must be a number"),
    ({"artifact_version": "<bt>"}, "is bt, not an artifact classifier"),
    ({"artifact_version": "<artifact>", "artifact_weight": 0}, "reward.artifact_weight must be a number > 0"),
    ({"artifact_weight": 1.0}, "reward.artifact_weight needs reward.artifact_version"),
    ({"temperature": 1.0}, "reward: an object with version, conservative_k"),
]


def test_every_bad_reward_is_refused_with_nothing_stored(versions: dict[str, Any], manager: Any) -> None:
    """One project for all the cases (training its three reward models is the slow part)."""
    from tests.factories import client_for

    for reward, message in BAD_REWARDS:
        resolved = {
            k: versions[v[1:-1]].number if isinstance(v, str) and v.startswith("<") else v
            for k, v in reward.items()
        }
        with pytest.raises(Invalid, match=message) as exc:
            services.rl_job_create(
                project=versions["project"], actor=manager, algorithm="ddpo", config=_config(), reward=resolved,
                dispatch=False,
            )  # fmt: skip
        assert exc.value.code == "bad_reward", reward
        r = client_for(manager).post(
            f"/api/projects/{versions['project'].slug}/rl-jobs/",
            {"algorithm": "ddpo", "config": _config(), "reward": resolved},
            format="json",
        )
        assert r.status_code == 400 and message in r.json()["error"]["message"], (reward, r.content)
        assert RLJob.objects.count() == 0


def test_the_reward_over_rest(versions: dict[str, Any], manager: Any) -> None:
    from tests.factories import client_for

    body = {
        "algorithm": "ddpo",
        "config": _config(),
        "reward": {"artifact_version": versions["artifact"].number},
    }
    r = client_for(manager).post(f"/api/projects/{versions['project'].slug}/rl-jobs/", body, format="json")
    assert r.status_code == 202, r.content
    job = r.json()
    assert (job["reward_model"], job["artifact_model"]) == (
        versions["bt"].number,
        versions["artifact"].number,
    )
    assert job["reward_options"] == {"conservative_k": 0.0, "artifact_weight": 1.0}
