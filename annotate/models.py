"""Annotation data model. Invariants are database constraints, not Python checks."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class Modality(models.TextChoices):
    IMAGE = "image", "Image"
    VIDEO = "video", "Video"
    TEXT = "text", "Text"


class Project(models.Model):
    class Mode(models.TextChoices):
        PAIRWISE = "pairwise", "Pairwise"
        RANKING = "ranking", "K-wise ranking"

    class Policy(models.TextChoices):
        PRIORITY = "priority", "Highest priority first (ties: oldest first)"

    slug = models.SlugField(max_length=80, unique=True)
    name = models.CharField(max_length=200)
    modality = models.CharField(
        max_length=10,
        choices=Modality.choices,
        blank=True,
        default="",
        help_text="Empty means mixed modalities.",
    )
    instructions = models.TextField(blank=True, default="", help_text="Markdown shown to annotators on '?'.")
    allow_tie = models.BooleanField(default=True)
    allow_both_bad = models.BooleanField(default=True)
    aspects = models.JSONField(
        default=list,
        blank=True,
        help_text='Named criteria judged separately: [{"key": "alignment", "label": "..."}]',
    )
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.PAIRWISE)
    k = models.PositiveSmallIntegerField(default=2, help_text="Outputs per comparison (2 for pairwise).")
    overlap = models.PositiveSmallIntegerField(default=1, help_text="Judgments wanted per comparison.")
    gold_rate = models.FloatField(default=0.0, help_text="Share of served comparisons that are gold checks.")
    assignment_policy = models.CharField(max_length=10, choices=Policy.choices, default=Policy.PRIORITY)
    lease_seconds = models.PositiveIntegerField(default=900)
    undo_seconds = models.PositiveIntegerField(default=30)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(k__gte=2) & Q(k__lte=16), name="project_k_range"),
            models.CheckConstraint(
                condition=Q(overlap__gte=1) & Q(overlap__lte=100), name="project_overlap_range"
            ),
            models.CheckConstraint(
                condition=Q(gold_rate__gte=0) & Q(gold_rate__lte=1), name="project_gold_rate_range"
            ),
            models.CheckConstraint(condition=~Q(mode="pairwise") | Q(k=2), name="project_pairwise_k2"),
            models.CheckConstraint(condition=Q(lease_seconds__gte=10), name="project_lease_min"),
        ]

    def __str__(self) -> str:
        return self.slug


class ProjectMember(models.Model):
    class Role(models.TextChoices):
        MANAGER = "manager", "Manager"
        ANNOTATOR = "annotator", "Annotator"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="members")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.ANNOTATOR)
    paused = models.BooleanField(default=False, help_text="Paused annotators get no new work.")
    joined_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="member_unique")]

    def __str__(self) -> str:
        return f"{self.user_id}@{self.project_id} ({self.role})"


class Prompt(models.Model):
    # No index of its own: prompt_unique_text leads with it.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts", db_index=False)
    text = models.TextField()
    text_hash = models.CharField(max_length=64, help_text="sha256 of the text, for dedupe.")
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "text_hash"], name="prompt_unique_text"),
            # Target of the composite foreign keys that keep a comparison's samples on its prompt.
            models.UniqueConstraint(fields=["id", "project"], name="prompt_id_project"),
        ]

    def __str__(self) -> str:
        return self.text[:60]


class Generator(models.Model):
    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class GeneratorVersion(models.Model):
    generator = models.ForeignKey(Generator, on_delete=models.CASCADE, related_name="versions")
    name = models.CharField(max_length=200, help_text="Checkpoint or release label.")
    checkpoint = models.CharField(
        max_length=500, blank=True, default="", help_text="Path or URI; empty for uploads."
    )
    is_external = models.BooleanField(default=True, help_text="Uploaded outputs rather than a model we run.")
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["generator", "name"], name="genversion_unique")]

    def __str__(self) -> str:
        return f"{self.generator.name}@{self.name}"


def sample_upload_path(instance: Sample, filename: str) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else "bin"
    h = instance.content_hash
    return f"samples/{instance.project_id}/{h[:2]}/{h}.{ext}"


# Foreign keys marked ``db_constraint=False`` below are still enforced by PostgreSQL: through the
# composite keys of migration 0002, which imply them (a sample's (prompt, project) must be a
# prompt's (id, project), so both exist). Checking them twice cost a third of a bulk import's
# time in the database (migration 0011). ``db_index=False``: a composite index leads with it.
class Sample(models.Model):
    project = models.ForeignKey(
        Project, on_delete=models.CASCADE, related_name="samples", db_constraint=False, db_index=False
    )
    prompt = models.ForeignKey(
        Prompt, on_delete=models.PROTECT, related_name="samples", db_constraint=False, db_index=False
    )
    generator_version = models.ForeignKey(
        GeneratorVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="samples"
    )
    modality = models.CharField(max_length=10, choices=Modality.choices)
    media = models.FileField(upload_to=sample_upload_path, blank=True, default="", max_length=300)
    mime_type = models.CharField(max_length=100, blank=True, default="")
    text = models.TextField(blank=True, default="")
    content_hash = models.CharField(max_length=64)
    byte_size = models.BigIntegerField(default=0)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    duration = models.FloatField(null=True, blank=True, help_text="Seconds (video).")
    frames = models.PositiveIntegerField(null=True, blank=True)
    fps = models.FloatField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A sample is its bytes under its prompt: the same refusal under two prompts is two samples.
            models.UniqueConstraint(
                fields=["project", "prompt", "content_hash"], name="sample_unique_content"
            ),
            models.UniqueConstraint(fields=["id", "prompt"], name="sample_id_prompt"),
            # An empty text is a valid output (the model said nothing); a text sample has no media.
            models.CheckConstraint(
                condition=(Q(modality="text") & Q(media=""))
                | (Q(modality__in=["image", "video"]) & ~Q(media="")),
                name="sample_payload_matches_modality",
            ),
        ]
        indexes = [models.Index(fields=["prompt", "generator_version"])]

    def __str__(self) -> str:
        return f"{self.modality} sample {self.pk}"


class Comparison(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        COMPLETE = "complete", "Complete"
        DISABLED = "disabled", "Disabled"

    class Origin(models.TextChoices):
        EXPLICIT = "explicit", "Explicit (API/upload)"
        RANDOM = "random", "Random pairs per prompt"
        ACTIVE = "active", "Active learning"
        LOOP = "loop", "Loop round"
        IMPORT = "import", "Imported preference data"

    project = models.ForeignKey(
        Project, on_delete=models.CASCADE, related_name="comparisons", db_constraint=False
    )
    prompt = models.ForeignKey(
        Prompt, on_delete=models.PROTECT, related_name="comparisons", db_constraint=False
    )
    samples = models.ManyToManyField(Sample, through="ComparisonSample", related_name="comparisons")
    priority = models.FloatField(default=0.0)
    priority_fixed = models.BooleanField(
        default=False,
        help_text="Served in the order its priority sets; active learning leaves it alone (the loop's "
        "new-vs-incumbent verdicts, which must be a fair sample of the round's outputs).",
    )
    origin = models.CharField(max_length=10, choices=Origin.choices, default=Origin.EXPLICIT)
    origin_round = models.PositiveIntegerField(null=True, blank=True)
    overlap = models.PositiveSmallIntegerField(default=1, help_text="Judgments wanted.")
    slots_taken = models.PositiveSmallIntegerField(default=0, help_text="Active leases + judgments.")
    judgments_count = models.PositiveSmallIntegerField(default=0)
    is_gold = models.BooleanField(default=False)
    gold_answer = models.JSONField(null=True, blank=True, help_text='{"outcome": "a"} or {"ranking": [ids]}')
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(overlap__gte=1), name="comparison_overlap_min"),
            models.CheckConstraint(
                condition=Q(slots_taken__lte=F("overlap")), name="comparison_slots_le_overlap"
            ),
            models.CheckConstraint(
                condition=Q(judgments_count__lte=F("slots_taken")), name="comparison_judgments_le_slots"
            ),
            models.CheckConstraint(
                condition=Q(is_gold=False) | Q(gold_answer__isnull=False), name="comparison_gold_has_answer"
            ),
            models.UniqueConstraint(fields=["id", "prompt"], name="comparison_id_prompt"),
        ]
        indexes = [
            # The hot path of `next`: open comparisons with a free slot, best first.
            models.Index(
                F("project"),
                F("priority").desc(),
                F("id"),
                name="comparison_open_queue",
                condition=Q(status="open") & Q(slots_taken__lt=F("overlap")),
            ),
        ]

    def __str__(self) -> str:
        return f"comparison {self.pk}"


class ComparisonSample(models.Model):
    """A sample's position in a comparison. ``prompt`` is denormalised so that composite foreign
    keys (added in migration 0002) make the database refuse a sample of another prompt."""

    comparison = models.ForeignKey(
        Comparison, on_delete=models.CASCADE, related_name="entries", db_constraint=False, db_index=False
    )
    sample = models.ForeignKey(Sample, on_delete=models.PROTECT, related_name="entries", db_constraint=False)
    prompt = models.ForeignKey(Prompt, on_delete=models.PROTECT, related_name="+", db_constraint=False)
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["comparison", "position"]
        constraints = [
            models.UniqueConstraint(fields=["comparison", "position"], name="compsample_unique_position"),
            models.UniqueConstraint(fields=["comparison", "sample"], name="compsample_no_self_compare"),
        ]

    def __str__(self) -> str:
        return f"comparison {self.comparison_id} #{self.position}: sample {self.sample_id}"


class Assignment(models.Model):
    """A lease of one comparison slot to one annotator."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        DONE = "done", "Judged"
        SKIPPED = "skipped", "Skipped"
        EXPIRED = "expired", "Expired"

    # No single-column indexes where a composite one leads with the column (assignment_mine,
    # assignment_once_per_annotator): each index is written at every lease and every label.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+", db_index=False)
    comparison = models.ForeignKey(
        Comparison, on_delete=models.CASCADE, related_name="assignments", db_index=False
    )
    annotator = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    display_order = models.JSONField(help_text="Sample ids in the order shown, left to right.")
    leased_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "annotator"], name="assignment_once_per_annotator"),
        ]
        indexes = [
            models.Index(fields=["project", "annotator", "status", "leased_at"], name="assignment_mine"),
            models.Index(
                fields=["expires_at"], name="assignment_active_expiry", condition=Q(status="active")
            ),
            # Skips are rare: a small index that finds the comparisons someone skipped ("stuck").
            models.Index(
                fields=["project", "comparison"], name="assignment_skipped", condition=Q(status="skipped")
            ),
        ]

    def __str__(self) -> str:
        return f"lease {self.pk} of comparison {self.comparison_id} ({self.status})"


class Judgment(models.Model):
    class Outcome(models.TextChoices):
        A = "a", "First sample (canonical order) wins"
        B = "b", "Second sample wins"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"
        RANKING = "ranking", "Full ranking"

    class Source(models.TextChoices):
        UI = "ui", "Labeling UI"
        API = "api", "API"
        IMPORT = "import", "Import"
        SIMULATED = "simulated", "Simulated annotator"

    # Members of this Django group may submit source=simulated with their token (docs/API.md).
    SIMULATED_GROUP = "simulated"

    # Composite indexes lead with these three (judgment_project_time, judgment_once_per_annotator,
    # judgment_annotator_time); single-column ones would only add writes to every label.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="judgments", db_index=False)
    comparison = models.ForeignKey(
        Comparison, on_delete=models.CASCADE, related_name="judgments", db_index=False
    )
    annotator = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="judgments", db_index=False
    )
    assignment = models.OneToOneField(
        Assignment, null=True, blank=True, on_delete=models.SET_NULL, related_name="judgment"
    )
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    winner = models.ForeignKey(Sample, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    ranking = models.JSONField(null=True, blank=True, help_text="Sample ids best first (k-wise).")
    aspects = models.JSONField(default=dict, blank=True, help_text='{"aspect key": "a"|"b"|"tie"|"both_bad"}')
    rationale = models.TextField(blank=True, default="")
    artifacts = models.JSONField(
        default=list, blank=True, help_text='[{"sample": id, "tags": [...], "regions": [[x, y, w, h], ...]}]'
    )
    displayed_order = models.JSONField(help_text="Sample ids as they were shown, left to right.")
    time_spent_ms = models.PositiveIntegerField(default=0)
    idempotency_key = models.CharField(max_length=64, blank=True, default="")
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.UI)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["comparison", "annotator"], name="judgment_once_per_annotator"),
            models.UniqueConstraint(
                fields=["annotator", "idempotency_key"],
                name="judgment_idempotency",
                condition=~Q(idempotency_key=""),
            ),
            models.CheckConstraint(
                condition=(Q(outcome="ranking") & Q(ranking__isnull=False))
                | (~Q(outcome="ranking") & Q(ranking__isnull=True)),
                name="judgment_ranking_matches_outcome",
            ),
            models.CheckConstraint(
                condition=~Q(outcome__in=["a", "b"]) | Q(winner__isnull=False), name="judgment_winner_set"
            ),
        ]
        indexes = [
            models.Index(fields=["project", "created_at"], name="judgment_project_time"),
            models.Index(fields=["annotator", "created_at"], name="judgment_annotator_time"),
            # Exports stream judgments in comparison order: this index makes that a scan, no sort.
            models.Index(fields=["project", "comparison", "id"], name="judgment_export_order"),
        ]

    def __str__(self) -> str:
        return f"judgment {self.pk}: {self.outcome} on comparison {self.comparison_id}"


def snapshot_upload_path(instance: DatasetSnapshot, filename: str) -> str:
    return f"snapshots/{instance.project_id}/{instance.pk}-{filename}"


class DatasetSnapshot(models.Model):
    """An immutable, content-hashed dataset version: the query that made it, its row count, the
    sha256 of its bytes and the file. Reward-model training records which snapshot it used."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="snapshots")
    name = models.CharField(max_length=200, blank=True, default="")
    spec = models.JSONField(help_text="Schema, format, aggregation and filters the rows were made with.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    rows_expected = models.BigIntegerField(null=True, blank=True, help_text="Judgments matching the filters.")
    rows_written = models.BigIntegerField(default=0)
    row_count = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, default="")
    byte_size = models.BigIntegerField(null=True, blank=True)
    file = models.FileField(upload_to=snapshot_upload_path, blank=True, default="", max_length=300)
    error = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=~Q(status="done") | (~Q(sha256="") & Q(row_count__isnull=False) & ~Q(file="")),
                name="snapshot_done_has_hash_and_file",
            ),
        ]
        indexes = [models.Index(fields=["project", "-created_at"], name="snapshot_project_time")]

    def __str__(self) -> str:
        return f"snapshot {self.pk} of {self.project_id} ({self.status})"
