"""Reward models: encoders and their cached embeddings, training jobs, the version registry, scores.

Flow: a ``RewardTrainingJob`` reads a ``DatasetSnapshot`` (raw judgments), makes sure every sample
and prompt it touches has an embedding under the job's ``Encoder`` (computed once, cached here as
float16 bytes), trains a head of the chosen kind on those cached features, evaluates it, and saves a
``RewardModelVersion`` (a ``save_pretrained``-style directory). Champion/challenger decides whether
the version becomes the project's active one; the active version scores samples (``SampleScore``)
and sets comparison priorities for active learning.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from annotate.models import DatasetSnapshot, Project, Prompt, Sample
from rewards.ml.names import KINDS

KIND_CHOICES = list(KINDS.items())  # the one list of kinds: rewards/ml/names.py


class Encoder(models.Model):
    """A frozen encoder, identified by the fingerprint of its weights (not by its path: the same
    weights copied elsewhere share cached embeddings)."""

    fingerprint = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    path = models.CharField(max_length=1000, help_text="Local directory it was last loaded from.")
    family = models.CharField(max_length=20, help_text="clip | siglip | text")
    model_type = models.CharField(max_length=50)
    dim = models.PositiveIntegerField()
    modalities = models.JSONField(
        default=list,
        help_text="What its samples may be: image/video for CLIP/SigLIP, text for sentence encoders, "
        "or what its config.json's sample_modalities says.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.family}, {self.dim}d, {self.fingerprint[:8]})"


class SampleEmbedding(models.Model):
    """A sample's vectors under one encoder and input form: ``count`` x ``dim`` float16, row-major (one
    vector for an image or a text, one per decoded frame for a video).

    ``input`` says what was embedded: the sample alone (``response``), or for a text sample under a
    sentence encoder its prompt and text together as one text pair (``joint``, the heads' and finetune's
    ``text_input="joint"``). The two differ, so each form is cached apart."""

    class Input(models.TextChoices):
        RESPONSE = "response", "the sample alone"
        JOINT = "joint", "prompt and text sample together (text pair)"

    sample = models.ForeignKey(Sample, on_delete=models.CASCADE, related_name="embeddings")
    encoder = models.ForeignKey(Encoder, on_delete=models.CASCADE, related_name="+")
    input = models.CharField(max_length=10, choices=Input.choices, default=Input.RESPONSE)
    count = models.PositiveSmallIntegerField(default=1)
    vectors = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["encoder", "sample", "input"], name="sample_embedding_once"),
            models.CheckConstraint(condition=Q(count__gte=1), name="sample_embedding_count_positive"),
            models.CheckConstraint(
                condition=Q(input__in=["response", "joint"]), name="sample_embedding_input_known"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.input} embedding of sample {self.sample_id} under encoder {self.encoder_id}"


class PromptEmbedding(models.Model):
    """A prompt's text-tower vector (float16), for prompt-conditioned scoring."""

    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="embeddings")
    encoder = models.ForeignKey(Encoder, on_delete=models.CASCADE, related_name="+")
    vector = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["encoder", "prompt"], name="prompt_embedding_once")]

    def __str__(self) -> str:
        return f"embedding of prompt {self.prompt_id} under encoder {self.encoder_id}"


class RewardConfig(models.Model):
    """Per-project reward settings: the default encoder and kind, and when to retrain by itself."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="reward_config")
    encoder_path = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        help_text="Local encoder directory (CLIP/SigLIP for images and videos, a sentence encoder for "
        "text). Blank: the bundled MiniLM for a text project, else the built-in image-text encoder "
        "(or RL_DEFAULT_MEDIA_ENCODER).",
    )
    kind = models.CharField(max_length=20, choices=KIND_CHOICES, default="bt")
    hyperparameters = models.JSONField(default=dict, blank=True, help_text="Overrides of the kind's config.")
    holdout = models.FloatField(default=0.2, help_text="Share of comparisons held out for evaluation.")
    video_frames = models.PositiveSmallIntegerField(default=8)
    auto_retrain = models.BooleanField(default=False, help_text="Retrain by itself (checked by beat).")
    retrain_min_new_judgments = models.PositiveIntegerField(
        default=500, help_text="Retrain once at least this many judgments arrived since the last job."
    )
    retrain_every_minutes = models.PositiveIntegerField(
        null=True, blank=True, help_text="Also retrain this often when any new judgment arrived (blank: off)."
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"reward config of {self.project}"


class RewardTrainingJob(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Trigger(models.TextChoices):
        MANUAL = "manual"
        AUTO = "auto"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="reward_jobs")
    kind = models.CharField(max_length=20, choices=KIND_CHOICES)
    encoder = models.ForeignKey(Encoder, on_delete=models.PROTECT, related_name="jobs")
    encoder_path = models.CharField(max_length=1000)
    snapshot = models.ForeignKey(DatasetSnapshot, on_delete=models.PROTECT, related_name="reward_jobs")
    config = models.JSONField(help_text="The resolved, validated config of the kind.")
    holdout = models.FloatField(default=0.2)
    video_frames = models.PositiveSmallIntegerField(default=8)
    device = models.CharField(max_length=20, default="cpu")
    promote = models.BooleanField(default=True, help_text="Run champion/challenger after training.")
    trigger = models.CharField(max_length=10, choices=Trigger.choices, default=Trigger.MANUAL)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    progress = models.JSONField(default=dict, blank=True, help_text="phase, step, total_steps, loss, eta_s")
    cancel_requested = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last progress write; a running job silent for long lost its worker."
    )
    error = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["project", "-created_at"], name="reward_job_project_time")]
        constraints = [
            models.CheckConstraint(
                condition=Q(holdout__gt=0) & Q(holdout__lt=1), name="reward_job_holdout_range"
            )
        ]

    def __str__(self) -> str:
        return f"reward job {self.pk} ({self.kind}, {self.status})"


class RewardModelVersion(models.Model):
    """One trained reward model: where its files are and how well it did."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="reward_versions")
    number = models.PositiveIntegerField(help_text="1, 2, ... per project.")
    job = models.OneToOneField(RewardTrainingJob, on_delete=models.PROTECT, related_name="version")
    kind = models.CharField(max_length=20, choices=KIND_CHOICES)
    encoder = models.ForeignKey(Encoder, on_delete=models.PROTECT, related_name="versions")
    snapshot = models.ForeignKey(DatasetSnapshot, on_delete=models.PROTECT, related_name="reward_versions")
    path = models.CharField(
        max_length=1000, help_text="save_pretrained directory (config.json + safetensors)."
    )
    metrics = models.JSONField(default=dict, help_text="holdout, gold, majority agreement, calibration ...")
    curves = models.JSONField(default=list, blank=True)
    decision = models.JSONField(
        default=dict, blank=True, help_text="Champion/challenger outcome and figures."
    )
    is_active = models.BooleanField(default=False)
    scored_at = models.DateTimeField(
        null=True, blank=True, help_text="When scoring (and comparison priorities) last started."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="reward_version_number"),
            models.UniqueConstraint(
                fields=["project"], condition=Q(is_active=True), name="reward_version_one_active"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project.slug} reward v{self.number} ({self.kind})"


class SampleScore(models.Model):
    """A sample's score under one reward-model version."""

    sample = models.ForeignKey(Sample, on_delete=models.CASCADE, related_name="scores")
    version = models.ForeignKey(RewardModelVersion, on_delete=models.CASCADE, related_name="scores")
    reward = models.FloatField()
    uncertainty = models.FloatField(null=True, blank=True)
    artifact_prob = models.FloatField(null=True, blank=True)
    aspects = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["version", "sample"], name="sample_score_once")]

    def __str__(self) -> str:
        return f"sample {self.sample_id}: {self.reward:.4f} under version {self.version_id}"


__all__ = [
    "Encoder",
    "PromptEmbedding",
    "RewardConfig",
    "RewardModelVersion",
    "RewardTrainingJob",
    "SampleEmbedding",
    "SampleScore",
]
