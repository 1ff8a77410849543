"""The closed loop as `manage.py up` runs it: a real Celery worker (queues ``default`` and ``gpu``)
and real Celery beat (the database scheduler, ticking the loop every second) advance a round by
themselves while a simulated annotator judges in this process: labels -> reward job -> DDPO round
-> its samples queued -> verdicts -> evaluated, then the loop ends at its last round. Nothing here
calls a loop step or a job; the test only judges and watches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from annotate import services as annotate_services
from annotate.models import ProjectMember, Sample
from tests.rewards.helpers import simulate
from tests.rewards.test_worker import ROOT, _worker_env
from tests.training.test_jobs import _config
from training import services
from training.models import LoopConfig, LoopRound

RENDER = {"per_prompt": 2, "steps": 2, "guidance_scale": 1.0}


def _celery(*args: str, log: Any) -> subprocess.Popen[str]:
    env = {**_worker_env(), "RL_LOOP_TICK_SECONDS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _prefer_new(a: Sample, b: Sample) -> int:
    """The RL round's output (``<project>-rl``) wins; otherwise the brighter sample does."""
    a_new = bool(a.generator_version and a.generator_version.generator.name.endswith("-rl"))
    b_new = bool(b.generator_version and b.generator_version.generator.name.endswith("-rl"))
    if a_new != b_new:
        return a.id if a_new else b.id
    return a.id if float(a.metadata.get("brightness", 0)) >= float(b.metadata.get("brightness", 0)) else b.id


@pytest.mark.django_db(transaction=True)
def test_worker_and_beat_run_a_round_by_themselves(
    project: Any, manager: Any, make_user: Any, tmp_path: Path
) -> None:
    from config.celery import app

    app.control.purge()
    services.loop_config_set(
        project=project, actor=manager, algorithm="ddpo", rl_config=_config(iterations=1),
        feedback={"prompts": 2, "within_pairs": 1, "render": RENDER}, reward_hyperparameters={"epochs": 3},
        retrain_after=6, verdicts_needed=4, max_rounds=1,
    )  # fmt: skip
    judge = make_user("judge-live")
    annotate_services.project_member_set(
        project=project, actor=manager, user=judge, role=ProjectMember.Role.ANNOTATOR
    )
    annotate_services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=8, seed=7
    )
    log = open(tmp_path / "celery.log", "w")  # noqa: SIM115 - closed in finally
    worker = _celery(
        "worker", "-Q", "default,gpu", "--concurrency", "1", "--loglevel", "INFO",
        "-n", f"test-loop-{os.getpid()}@%h", log=log,
    )  # fmt: skip
    beat = _celery(
        "beat", "--loglevel", "INFO", "--pidfile=", "-S", "django_celery_beat.schedulers:DatabaseScheduler",
        log=log,
    )  # fmt: skip
    seen: list[str] = []

    def state() -> str:
        r = LoopRound.objects.filter(project=project).order_by("-number").first()
        now = r.state if r is not None else "none"
        if not seen or seen[-1] != now:
            seen.append(now)
        return now

    def wait(until: Any, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                return
            for name, proc in (("worker", worker), ("beat", beat)):
                assert proc.poll() is None, f"{name} exited early:\n" + (tmp_path / "celery.log").read_text()
            time.sleep(0.5)
        raise AssertionError(
            f"timed out waiting for {what}; states {seen}\n" + (tmp_path / "celery.log").read_text()
        )

    try:
        wait(lambda: state() == "waiting_for_labels", "beat to open round 1")
        assert simulate(project, judge, _prefer_new, noise=0.0, limit=6) == 6  # the new labels
        wait(lambda: state() == "awaiting_verdicts", "the reward job, the RL job and its samples")
        simulate(project, judge, _prefer_new, noise=0.0)  # the verdicts (and whatever else is open)
        wait(lambda: state() in ("evaluated", "flagged"), "the evaluation")
        wait(lambda: not LoopConfig.objects.get(project=project).enabled, "the loop to end at its last round")
    finally:
        for proc in (beat, worker):
            proc.terminate()
        for proc in (beat, worker):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    r = LoopRound.objects.get(project=project, number=1)
    assert r.state == "evaluated" and r.human_win_rate == 1.0 and r.verdicts >= 4, r.reason
    assert [h["state"] for h in r.history] == [
        "waiting_for_labels", "reward_training", "rl", "sampling", "awaiting_verdicts", "evaluated",
    ]  # fmt: skip
    # Every job ran in the worker, not here.
    assert r.reward_job is not None and r.reward_job.status == "succeeded"
    assert r.rl_job is not None and r.rl_job.status == "succeeded"
    assert r.sampling_job is not None and r.sampling_job.status == "succeeded"
    assert LoopConfig.objects.get(project=project).stopped_reason == "done: 1 rounds"
    text = (tmp_path / "celery.log").read_text()
    for task in (
        "training.tasks.loop_tick",
        "gpu_rl_job_run",
        "gpu_sampling_job_render",
        "sampling_job_queue",
    ):
        assert task in text, task
