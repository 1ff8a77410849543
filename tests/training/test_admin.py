"""RL jobs in the admin: launched from the form (every refusal shown on the form, nothing stored),
watched with per-step metrics plotted and checkpoints listed, cancelled with the action; sampling
jobs listed with their rounds."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client

from tests.training.ml.test_ddpo import _pipeline_dir
from training import services
from training.admin import metric_charts
from training.models import RLJob, SamplingJob

pytestmark = pytest.mark.django_db

CONFIG = {
    "iterations": 2,
    "prompts_per_iteration": 2,
    "images_per_prompt": 2,
    "sample_steps": 2,
    "train_batch_size": 2,
    "guidance_scale": 1.0,
}


@pytest.fixture
def admin_client(manager: Any) -> Client:
    manager.is_staff = True
    manager.is_superuser = True
    manager.save()
    c = Client()
    c.force_login(manager)
    return c


def test_launch_watch_plot_and_cancel_in_admin(admin_client: Client, project: Any) -> None:
    url = "/admin/training/rljob/add/"
    page = admin_client.get(url)
    assert page.status_code == 200 and b"Launch an RL job" in page.content
    form = {"project": project.id, "algorithm": "ddpo", "feedback": ""}
    for config, message in [
        ("{oops", "not JSON"),
        ("[1]", "a JSON object is expected"),
        (json.dumps({**CONFIG, "pipeline": "/nowhere"}), "no such directory"),
        (json.dumps({**CONFIG, "pipeline": str(_pipeline_dir()), "eta": 0}), "eta must be in"),
    ]:
        r = admin_client.post(url, {**form, "config": config})
        assert r.status_code == 200 and message in r.content.decode(), message
    pipe = str(_pipeline_dir())
    good = json.dumps({**CONFIG, "pipeline": pipe})
    r = admin_client.post(url, {**form, "config": good, "feedback": '{"prompts": 0}'})
    assert r.status_code == 200 and "prompts must be" in r.content.decode()
    assert RLJob.objects.count() == 0

    feedback = json.dumps({"prompts": 2, "within_pairs": 1, "render": {"steps": 2, "guidance_scale": 1.0}})
    ok = admin_client.post(
        url, {**form, "config": json.dumps({**CONFIG, "pipeline": pipe}), "feedback": feedback}
    )
    assert ok.status_code == 302, ok.content.decode()[:2000]
    job = RLJob.objects.get()
    assert job.feedback is not None and job.feedback["prompts"] == 2
    watch = admin_client.get(f"/admin/training/rljob/{job.id}/change/")
    assert watch.status_code == 200 and b'http-equiv="refresh"' in watch.content  # queued: reloads
    assert b"no steps yet" in watch.content

    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    done = admin_client.get(f"/admin/training/rljob/{job.id}/change/").content.decode()
    assert 'http-equiv="refresh"' not in done
    for key in ("reward_mean", "approx_kl", "clip_fraction", "loss"):
        assert f">{key}</text>" in done, key  # a chart titled with it
    assert "checkpoint-2" in done or "final" in done or job.checkpoints[-1] in done
    sampling = SamplingJob.objects.get(rl_job=job)
    assert f"samplingjob/{sampling.id}/change/" in done and "round 1 (queued" in done
    listing = admin_client.get("/admin/training/samplingjob/").content.decode()
    assert f"/admin/training/samplingjob/{sampling.id}/change/" in listing
    assert admin_client.get(f"/admin/training/samplingjob/{sampling.id}/change/").status_code == 200

    queued = services.rl_job_create(
        project=project,
        actor=job.created_by,
        algorithm="ddpo",
        config={**CONFIG, "pipeline": pipe},
        dispatch=False,
    )
    r = admin_client.post(
        "/admin/training/rljob/", {"action": "cancel_jobs", "_selected_action": [queued.id, job.id]}
    )
    assert r.status_code == 302
    queued.refresh_from_db()
    assert queued.status == "cancelled"


def test_metric_charts_plot_every_number_logged() -> None:
    metrics: list[dict[str, Any]] = [
        {"iteration": 1, "reward_mean": 0.5, "kl": 0.0, "note": "x", "flag": True},
        {"iteration": 2, "reward_mean": 0.6, "kl": float("nan")},
    ]
    svg = metric_charts(metrics)
    assert re.findall(r">(\w+)</text>", svg).count("reward_mean") >= 1
    assert svg.index(">reward_mean<") < svg.index(">kl<")  # reward first
    assert ">note<" not in svg and ">flag<" not in svg
    assert metric_charts([]) == "no steps yet"
