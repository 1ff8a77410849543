"""RL jobs: one row per run, with its validated config, status, progress and per-step metrics."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from annotate.models import Project
from training.algorithms import ALGORITHM_CHOICES


class RLJob(models.Model):
    """An RL fine-tuning run of a generator on a project's prompts, rewarded by the project's
    active reward model."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="rl_jobs")
    algorithm = models.CharField(max_length=30, choices=ALGORITHM_CHOICES)
    config = models.JSONField(help_text="the resolved config dataclass, as validated at launch")
    reward_version = models.ForeignKey(
        "rewards.RewardModelVersion",
        on_delete=models.PROTECT,
        related_name="rl_jobs",
        help_text="the reward model it optimises (the project's active one at launch)",
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    cancel_requested = models.BooleanField(default=False)
    step = models.PositiveIntegerField(default=0, help_text="iterations or optimizer steps done")
    total_steps = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(
        default=list, blank=True, help_text="one object per step, as the trainer logs it"
    )
    checkpoints = models.JSONField(default=list, blank=True, help_text="checkpoint directories, oldest first")
    output_dir = models.CharField(max_length=1000, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["project", "status"], name="rljob_project_status")]

    def __str__(self) -> str:
        return f"RL job {self.id} ({self.algorithm}, {self.status})"
