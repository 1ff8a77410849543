"""Periodic retraining (beat): fail stale jobs, and launch a job for each project whose reward config says one is due."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models.functions import Coalesce
from django.utils import timezone

from annotate.errors import Invalid
from annotate.models import Judgment
from rewards.models import (
    RewardConfig,
    RewardTrainingJob,
)
from rewards.services.jobs import reward_job_create

log = logging.getLogger(__name__)


def jobs_fail_stale(*, now: Any = None) -> int:
    """Mark failed the running jobs whose worker stopped reporting (killed, out of memory, machine
    lost): no progress write for ``RL_REWARD_JOB_STALE_SECONDS``. Without this, one dead job would
    block its project's automatic retraining for ever."""
    now = now or timezone.now()
    stale = int(getattr(settings, "RL_REWARD_JOB_STALE_SECONDS", 600))
    return (
        RewardTrainingJob.objects.filter(status=RewardTrainingJob.Status.RUNNING)
        .annotate(seen=Coalesce("heartbeat_at", "started_at", "created_at"))
        .filter(seen__lt=now - timedelta(seconds=stale))
    ).update(
        status=RewardTrainingJob.Status.FAILED,
        finished_at=now,
        error=f"worker lost: no progress report for {stale} s",
    )


def retrain_due(*, now: Any = None) -> list[int]:
    """Launch a job for every project whose auto-retrain rule is met: at least N judgments since the
    last job was created, or T minutes since it and at least one new judgment. Projects with a job
    queued or running are skipped. Returns the new job ids."""
    now = now or timezone.now()
    jobs_fail_stale(now=now)
    launched: list[int] = []
    for rc in RewardConfig.objects.filter(auto_retrain=True).select_related("project", "project__created_by"):
        project = rc.project
        jobs = RewardTrainingJob.objects.filter(project=project)
        if jobs.filter(
            status__in=[RewardTrainingJob.Status.QUEUED, RewardTrainingJob.Status.RUNNING]
        ).exists():
            continue
        last = jobs.order_by("-created_at").first()
        since = last.created_at if last else None
        judgments = Judgment.objects.filter(project=project)
        new = judgments.filter(created_at__gt=since).count() if since else judgments.count()
        due = new >= rc.retrain_min_new_judgments or bool(
            rc.retrain_every_minutes
            and new > 0
            and since
            and (now - since).total_seconds() >= rc.retrain_every_minutes * 60
        )
        if not due:
            continue
        try:
            job = reward_job_create(
                project=project, actor=project.created_by, trigger=RewardTrainingJob.Trigger.AUTO
            )
        except Invalid as exc:
            log.warning("auto-retrain of %s not launched: %s", project.slug, exc.message)
            continue
        launched.append(job.id)
    return launched
