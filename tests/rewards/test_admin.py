"""The admin as a manager uses it: launch a job with the form (bad input shown on the form, nothing
queued), watch it, read a version's metrics and curves, compare versions, make one active."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from rewards import services
from rewards.models import RewardModelVersion, RewardTrainingJob
from tests.rewards.helpers import brighter, image_project, simulate
from tests.rewards.ml.tiny_models import save_tiny_clip

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(manager: Any) -> Client:
    manager.is_superuser = True
    manager.save()
    c = Client()
    c.force_login(manager)
    return c


def test_launch_watch_and_compare_in_admin(
    admin_client: Client, make_project: Any, manager: Any, annotator: Any, tmp_path: Path
) -> None:
    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=2, per_prompt=10, pairs_per_prompt=30
    )
    simulate(project, annotator, brighter)
    clip = save_tiny_clip(tmp_path / "clip")
    url = "/admin/rewards/rewardtrainingjob/add/"
    page = admin_client.get(url)
    assert page.status_code == 200 and b"Launch a reward training job" in page.content

    form = {
        "project": project.id,
        "kind": "bt",
        "encoder_path": str(clip),
        "hyperparameters": '{"lr": -1}',
        "holdout": "0.2",
        "device": "cpu",
        "promote": "on",
    }
    bad = admin_client.post(url, form)
    assert bad.status_code == 200 and b"hyperparameter lr" in bad.content
    assert admin_client.post(url, {**form, "hyperparameters": "{oops"}).status_code == 200
    assert RewardTrainingJob.objects.count() == 0

    ok = admin_client.post(url, {**form, "hyperparameters": json.dumps({"epochs": 3})})
    assert ok.status_code == 302
    job = RewardTrainingJob.objects.get()
    watch = admin_client.get(f"/admin/rewards/rewardtrainingjob/{job.id}/change/")
    assert watch.status_code == 200 and b'http-equiv="refresh"' in watch.content  # reloads while queued
    services.reward_job_run(job_id=job.id)
    done = admin_client.get(f"/admin/rewards/rewardtrainingjob/{job.id}/change/")
    assert b'http-equiv="refresh"' not in done.content and b"v1" in done.content

    second = services.reward_job_create(
        project=project,
        actor=manager,
        encoder_path=str(clip),
        hyperparameters={"epochs": 3, "seed": 1},
        dispatch=False,
    )
    services.reward_job_run(job_id=second.id)
    v1, v2 = RewardModelVersion.objects.order_by("number")
    detail = admin_client.get(f"/admin/rewards/rewardmodelversion/{v1.id}/change/")
    assert detail.status_code == 200
    assert (
        b"<svg" in detail.content
        and b"training loss" in detail.content
        and b"holdout_accuracy" in detail.content
    )
    listing = admin_client.get("/admin/rewards/rewardmodelversion/")
    assert listing.status_code == 200 and b"Champion/challenger" in listing.content
    compare = admin_client.post(
        "/admin/rewards/rewardmodelversion/", {"action": "compare", "_selected_action": [v1.id, v2.id]}
    )
    assert compare.status_code == 200 and b"Compare reward model versions" in compare.content
    assert compare.content.count(b"<tr>") >= 3
    inactive = v2 if v1.is_active else v1
    admin_client.post(
        "/admin/rewards/rewardmodelversion/", {"action": "make_active", "_selected_action": [inactive.id]}
    )
    inactive.refresh_from_db()
    assert inactive.is_active
    assert RewardModelVersion.objects.filter(is_active=True).count() == 1
