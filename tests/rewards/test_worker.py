"""A real Celery worker (the same command `manage.py up` runs) trains a reward model end to end:
the API queues the job, the worker builds the snapshot, embeds, trains, registers the version,
promotes it and scores the project's samples."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from rewards.models import RewardModelVersion, RewardTrainingJob, SampleScore
from tests.factories import client_for
from tests.rewards.helpers import brighter, image_project, simulate
from tests.rewards.ml.tiny_models import save_tiny_clip

ROOT = Path(__file__).resolve().parents[2]


def _worker_env() -> dict[str, str]:
    db = connection.settings_dict
    env = dict(os.environ)
    env.update(
        {
            # The test database, not the development one.
            "DATABASE_URL": f"postgresql://{db['USER']}:@/{db['NAME']}?host={db['HOST']}",
            "REDIS_URL": settings.REDIS_URL,
            "MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, "the worker exited early"
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.django_db(transaction=True)
def test_real_worker_runs_a_job_end_to_end(
    make_project: Any, manager: Any, annotator: Any, tmp_path: Path
) -> None:
    from config.celery import app

    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=2, per_prompt=8, pairs_per_prompt=20
    )
    simulate(project, annotator, brighter)
    clip = save_tiny_clip(tmp_path / "clip")
    app.control.purge()  # nothing left over from another run may reach this worker
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            "default,gpu",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "-n",
            f"test-{os.getpid()}@%h",
        ],
        cwd=ROOT,
        env=_worker_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        r = client_for(manager).post(
            f"/api/projects/{project.slug}/reward-jobs/",
            {"kind": "bt", "encoder": str(clip), "hyperparameters": {"epochs": 5}},
            format="json",
        )
        assert r.status_code == 202, r.content
        job_id = r.json()["id"]

        def finished() -> bool:
            return RewardTrainingJob.objects.get(id=job_id).status not in ("queued", "running")

        _wait(finished, 180, "the job", proc)
        job = RewardTrainingJob.objects.get(id=job_id)
        assert job.status == "succeeded", job.error + (tmp_path / "worker.log").read_text()
        version = RewardModelVersion.objects.get(job=job)
        assert version.is_active and version.metrics["holdout_pairs"] > 0
        assert (
            client_for(annotator)
            .get(f"/api/projects/{project.slug}/reward-models/")
            .json()["versions"][0]["number"]
            == 1
        )
        # Promotion queued scoring on the gpu queue: every sample gets a score.
        _wait(lambda: SampleScore.objects.filter(version=version).count() == 16, 120, "scores", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert "gpu_train_reward_model" in (tmp_path / "worker.log").read_text()
