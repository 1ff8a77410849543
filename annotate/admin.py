from django.contrib import admin

from annotate import ratelimit, services
from annotate.models import (
    Assignment,
    Comparison,
    ComparisonSample,
    DatasetSnapshot,
    Generator,
    GeneratorVersion,
    Judgment,
    Project,
    ProjectMember,
    Prompt,
    Sample,
)


class MemberInline(admin.TabularInline):
    model = ProjectMember
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "modality", "mode", "overlap", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MemberInline]
    readonly_fields = ["created_at"]
    raw_id_fields = ["created_by"]


@admin.register(ProjectMember)
class ProjectMemberAdmin(admin.ModelAdmin):
    list_display = ["project", "user", "role", "paused"]
    list_filter = ["role", "paused", "project"]
    raw_id_fields = ["user"]


@admin.register(Prompt)
class PromptAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "text"]
    list_filter = ["project"]
    search_fields = ["text"]
    readonly_fields = ["text_hash"]


class VersionInline(admin.TabularInline):
    model = GeneratorVersion
    extra = 0


@admin.register(Generator)
class GeneratorAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    inlines = [VersionInline]


@admin.register(GeneratorVersion)
class GeneratorVersionAdmin(admin.ModelAdmin):
    list_display = ["generator", "name", "is_external", "created_at"]


@admin.register(Sample)
class SampleAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "project",
        "modality",
        "generator_version",
        "width",
        "height",
        "duration",
        "created_at",
    ]
    list_filter = ["modality", "project"]
    raw_id_fields = ["prompt", "generator_version"]
    readonly_fields = ["content_hash", "byte_size", "created_at"]
    list_select_related = ["project", "generator_version__generator"]


class ComparisonSampleInline(admin.TabularInline):
    model = ComparisonSample
    extra = 0
    raw_id_fields = ["sample", "prompt"]


@admin.register(Comparison)
class ComparisonAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "project",
        "status",
        "priority",
        "origin",
        "overlap",
        "slots_taken",
        "judgments_count",
        "is_gold",
    ]
    list_filter = ["status", "origin", "is_gold", "project"]
    raw_id_fields = ["prompt"]
    inlines = [ComparisonSampleInline]
    show_full_result_count = False


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "comparison", "annotator", "status", "leased_at", "expires_at"]
    list_filter = ["status", "project"]
    raw_id_fields = ["comparison", "annotator"]
    actions = ["expire_now"]
    show_full_result_count = False

    @admin.action(description="Return expired leases to the pool now")
    def expire_now(self, request, queryset):
        n = services.leases_expire()
        self.message_user(request, f"{n} expired leases returned to the pool")


@admin.register(Judgment)
class JudgmentAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "project",
        "comparison",
        "annotator",
        "outcome",
        "source",
        "time_spent_ms",
        "created_at",
    ]
    list_filter = ["outcome", "source", "project"]
    raw_id_fields = ["comparison", "annotator", "assignment", "winner"]
    show_full_result_count = False


@admin.register(DatasetSnapshot)
class DatasetSnapshotAdmin(admin.ModelAdmin):
    """Snapshots are immutable: visible here, never edited."""

    list_display = [
        "id",
        "project",
        "name",
        "status",
        "rows_written",
        "rows_expected",
        "row_count",
        "sha256",
        "created_at",
    ]
    list_filter = ["status", "project"]
    readonly_fields = [f.name for f in DatasetSnapshot._meta.fields]

    def has_change_permission(self, request, obj=None):
        return False


ratelimit.protect_admin_login(admin.site)
