"""RL jobs (one row per run, with its validated config, status, progress and per-step metrics) and
sampling jobs (a generator version's outputs rendered into samples and queued for people to judge)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from annotate.models import GeneratorVersion, Project
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
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="rl_jobs",
        help_text="the reward model it optimises (the project's active one at launch, or one chosen); "
        "none for the offline algorithms, which learn from judged pairs",
    )
    snapshot = models.ForeignKey(
        "annotate.DatasetSnapshot",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="offline algorithms: the judgments it learns from, frozen at launch",
    )
    artifact_version = models.ForeignKey(
        "rewards.RewardModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="an artifact classifier of the project whose P(artifact) is subtracted from the reward",
    )
    reward_options = models.JSONField(
        default=dict,
        blank=True,
        help_text="how the reward is made: {conservative_k, artifact_weight} (training/ml/reward.py)",
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    cancel_requested = models.BooleanField(default=False)
    step = models.PositiveIntegerField(default=0, help_text="iterations or optimizer steps done")
    total_steps = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(
        default=list, blank=True, help_text="one object per step, as the trainer logs it"
    )
    checkpoints = models.JSONField(default=list, blank=True, help_text="checkpoint directories, oldest first")
    base_version = models.ForeignKey(
        GeneratorVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="the generator version of the model it starts from (the incumbent of its feedback)",
    )
    feedback = models.JSONField(
        null=True,
        blank=True,
        help_text="when set, the sampling job queued at the end: {prompts, within_pairs, render}",
    )
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


class SamplingJob(models.Model):
    """A generator version's outputs for a set of prompts rendered into samples (with the seed and
    settings in each sample's metadata), then queued as comparisons for people to judge: against the
    incumbent on the same prompt and seed, and within the new version's group, tagged with the round."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RENDERING = "rendering", "Rendering"
        RENDERED = "rendered", "Rendered, comparisons being queued"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="sampling_jobs")
    version = models.ForeignKey(
        GeneratorVersion, on_delete=models.PROTECT, related_name="+", help_text="the version rendered"
    )
    incumbent = models.ForeignKey(
        GeneratorVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="the version it is compared with on the same prompts and seeds (none: within-group only)",
    )
    rl_job = models.ForeignKey(
        RLJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="sampling_jobs"
    )
    round = models.PositiveIntegerField(help_text="the round its comparisons are tagged with")
    prompt_ids = models.JSONField(default=list, help_text="the prompts rendered, chosen at launch")
    within_pairs = models.PositiveSmallIntegerField(
        default=1, help_text="comparisons per prompt between two of the new version's outputs"
    )
    config = models.JSONField(help_text="the render settings (training.ml.render.RenderConfig)")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    done = models.PositiveIntegerField(default=0, help_text="outputs rendered or reused")
    total = models.PositiveIntegerField(default=0, help_text="outputs wanted (both versions)")
    outputs = models.JSONField(
        default=dict,
        blank=True,
        help_text='{"new": [[prompt_id, seed, sample_id], ...], "incumbent": [...]}',
    )
    samples_created = models.PositiveIntegerField(default=0)
    samples_reused = models.PositiveIntegerField(default=0)
    comparisons_created = models.PositiveIntegerField(default=0)
    identical = models.PositiveIntegerField(
        default=0, help_text="new/incumbent pairs left out because both rendered the same bytes"
    )
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    rendered_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["project", "round"], name="samplingjob_project_round")]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(incumbent=models.F("version")), name="samplingjob_incumbent_not_version"
            ),
            models.CheckConstraint(
                condition=models.Q(done__lte=models.F("total")), name="samplingjob_done_le_total"
            ),
        ]

    def __str__(self) -> str:
        return f"sampling job {self.id} (round {self.round}, {self.status})"
