"""A real Celery worker runs an RL job, its process is SIGKILLed mid-job, and the job, requeued
(``acks_late``, ``reject_on_worker_lost``), resumes from its last whole checkpoint: every iteration
logged once, the resumed iterations continuing from the checkpoint, every checkpoint registered,
and then its feedback rendered on the gpu queue and queued for judging on the default queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from annotate.models import Comparison, GeneratorVersion
from tests.factories import client_for
from tests.rewards.test_worker import ROOT, _wait, _worker_env
from tests.training.ml.test_ddpo import _pipeline_dir
from training.models import RLJob, SamplingJob

CONFIG = {
    "iterations": 8,
    "prompts_per_iteration": 2,
    "images_per_prompt": 4,
    "sample_steps": 4,
    "train_batch_size": 4,
    "guidance_scale": 1.0,
    "checkpoint_every": 2,
}


def _worker(log: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
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
            f"test-rl-{os.getpid()}@%h",
        ],
        cwd=ROOT,
        env=_worker_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_worker_is_killed_resumes_from_its_last_checkpoint(
    project: Any, manager: Any, tmp_path: Path
) -> None:
    from config.celery import app

    app.control.purge()
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed in finally
    proc = _worker(log)
    try:
        r = client_for(manager).post(
            f"/api/projects/{project.slug}/rl-jobs/",
            {
                "algorithm": "ddpo",
                "config": {**CONFIG, "pipeline": str(_pipeline_dir())},
                "feedback": {"prompts": 2, "within_pairs": 1, "render": {"steps": 2, "guidance_scale": 1.0}},
            },
            format="json",
        )
        assert r.status_code == 202, r.content
        job_id = r.json()["id"]

        def past_first_checkpoint() -> bool:
            job = RLJob.objects.get(id=job_id)
            return bool(job.output_dir) and (Path(job.output_dir) / "checkpoint-2").is_dir() and job.step >= 2

        _wait(past_first_checkpoint, 240, "checkpoint-2", proc)
        children = psutil.Process(proc.pid).children()
        assert len(children) == 1  # the pool process running the job
        children[0].send_signal(signal.SIGKILL)
        killed_at = RLJob.objects.get(id=job_id).step
        assert killed_at < CONFIG["iterations"], "the job ended before it could be killed"

        def finished() -> bool:
            return RLJob.objects.get(id=job_id).status not in ("queued", "running")

        _wait(finished, 300, "the resumed job", proc)
        job = RLJob.objects.get(id=job_id)
        text = (tmp_path / "worker.log").read_text()
        assert job.status == "succeeded", job.error + text
        assert "WorkerLostError" in text or "SIGKILL" in text or "signal 9" in text, text
        # Every iteration logged once, in order: the steps after the checkpoint were run again.
        assert [m["iteration"] for m in job.metrics] == [float(i) for i in range(1, 9)]
        assert all(m["first_ratio_error"] == 0.0 for m in job.metrics)
        assert [Path(c).name for c in job.checkpoints] == [f"checkpoint-{i}" for i in (2, 4, 6, 8)]
        names = set(
            GeneratorVersion.objects.filter(generator__name=f"{project.slug}-rl").values_list(
                "name", flat=True
            )
        )
        assert names == {f"job{job.id}-checkpoint-{i}" for i in (2, 4, 6, 8)}
        assert not list(Path(job.output_dir).glob(".*tmp*"))  # no half-written checkpoint left

        # The feedback: rendered on the gpu queue, queued for judging on the default queue.
        def queued() -> bool:
            s = SamplingJob.objects.filter(rl_job_id=job_id).first()
            return s is not None and s.status in ("succeeded", "failed")

        _wait(queued, 180, "the feedback", proc)
        sampling = SamplingJob.objects.get(rl_job_id=job_id)
        assert sampling.status == "succeeded", sampling.error + (tmp_path / "worker.log").read_text()
        assert (
            Comparison.objects.filter(project=project, origin="loop", origin_round=sampling.round).count()
            == (sampling.comparisons_created)
            > 0
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "gpu_sampling_job_render" in text and "sampling_job_queue" in text
