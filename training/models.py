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
    start_version = models.ForeignKey(
        GeneratorVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="the LoRA version on its base that it continues (a previous loop round's); "
        "then the incumbent of its feedback",
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


class LoopConfig(models.Model):
    """A project's closed loop, switched on and off by a manager: retrain the reward model when
    enough new judgments arrived, run an RL round on it, render the new version's outputs and queue
    them against the incumbent, wait for human verdicts, evaluate (and guard), repeat."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="loop")
    enabled = models.BooleanField(default=False, help_text="the beat tick advances this project's rounds")
    paused = models.BooleanField(default=False, help_text="kept where it is; resuming loses no work")
    algorithm = models.CharField(max_length=30, choices=ALGORITHM_CHOICES)
    rl_config = models.JSONField(help_text="the RL algorithm's config, validated when set")
    feedback = models.JSONField(help_text="the round's sampling: {prompts, within_pairs, render}")
    reward_kind = models.CharField(max_length=20, default="bt")
    reward_hyperparameters = models.JSONField(default=dict, blank=True)
    encoder_path = models.CharField(max_length=1000, blank=True, help_text="blank: the project's default")
    retrain_after = models.PositiveIntegerField(default=50, help_text="new judgments before a round trains")
    verdicts_needed = models.PositiveIntegerField(
        default=20, help_text="human verdicts on new-vs-incumbent comparisons before a round is evaluated"
    )
    guard_margin = models.FloatField(
        default=0.15,
        help_text="flag reward hacking when humans prefer the new version this much less than "
        "the reward model predicted",
    )
    max_rounds = models.PositiveIntegerField(default=10)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="the manager who set it",
    )
    stopped_reason = models.TextField(
        blank=True, help_text="why the loop stopped by itself (a flag, a failure)"
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"loop of {self.project_id} ({'on' if self.enabled else 'off'})"


class LoopRound(models.Model):
    """One round of a project's loop, advanced one state at a time by the beat tick."""

    class State(models.TextChoices):
        WAITING_FOR_LABELS = "waiting_for_labels", "Waiting for labels"
        REWARD_TRAINING = "reward_training", "Training the reward model"
        RL = "rl", "RL round"
        SAMPLING = "sampling", "Sampling the new version"
        AWAITING_VERDICTS = "awaiting_verdicts", "Awaiting human verdicts"
        EVALUATED = "evaluated", "Evaluated"
        FLAGGED = "flagged", "Flagged: reward hacking"
        FAILED = "failed", "Failed"

    OPEN = (
        State.WAITING_FOR_LABELS,
        State.REWARD_TRAINING,
        State.RL,
        State.SAMPLING,
        State.AWAITING_VERDICTS,
    )

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="loop_rounds")
    number = models.PositiveIntegerField()
    state = models.CharField(max_length=20, choices=State.choices, default=State.WAITING_FOR_LABELS)
    judgments_at_start = models.PositiveIntegerField(
        help_text="the project's judgments the last reward model could have seen (those before the last "
        "round's reward job; all of them for the first round): the rest are new"
    )
    reward_job = models.ForeignKey(
        "rewards.RewardTrainingJob", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rl_job = models.ForeignKey(RLJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    sampling_job = models.ForeignKey(
        SamplingJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    incumbent = models.ForeignKey(
        GeneratorVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    new_version = models.ForeignKey(
        GeneratorVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    verdicts = models.PositiveIntegerField(default=0, help_text="human verdicts on new vs incumbent")
    predicted_win_rate = models.FloatField(null=True, blank=True, help_text="the reward model's P(new wins)")
    human_win_rate = models.FloatField(null=True, blank=True, help_text="ties count half")
    human_ci_low = models.FloatField(null=True, blank=True)
    human_ci_high = models.FloatField(null=True, blank=True)
    kl = models.FloatField(null=True, blank=True, help_text="the RL round's last logged KL to the reference")
    reason = models.TextField(blank=True)
    history = models.JSONField(default=list, blank=True, help_text="[{state, at}, ...]: the round's timeline")
    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["project", "number"]
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="loopround_number"),
            # At most one open round per project: two ticks can never start two rounds.
            models.UniqueConstraint(
                fields=["project"],
                condition=models.Q(
                    state__in=["waiting_for_labels", "reward_training", "rl", "sampling", "awaiting_verdicts"]
                ),
                name="loopround_one_open",
            ),
        ]

    def __str__(self) -> str:
        return f"round {self.number} of {self.project_id} ({self.state})"
