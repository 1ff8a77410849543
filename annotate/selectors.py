"""Reads of the annotation domain ("the pull")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone

from annotate.errors import Forbidden, NotFound
from annotate.models import Assignment, Comparison, Judgment, Project, ProjectMember, Sample


def project_get(*, slug: str) -> Project:
    project = Project.objects.filter(slug=slug).first()
    if project is None:
        raise NotFound(f"no project {slug!r}")
    return project


def member_role_require(
    *,
    project: Project,
    user: Any,
    roles: Sequence[str] = (ProjectMember.Role.MANAGER, ProjectMember.Role.ANNOTATOR),
) -> ProjectMember:
    """The user's membership, if their role is one of ``roles``. Staff act as managers.

    Non-members get 404 (the project's existence is not revealed); members without the role 403."""
    member = ProjectMember.objects.filter(project=project, user=user).first()
    if member is None:
        if getattr(user, "is_staff", False):
            return ProjectMember(project=project, user=user, role=ProjectMember.Role.MANAGER)
        raise NotFound(f"no project {project.slug!r}")
    if member.role not in roles:
        raise Forbidden(f"this needs the {' or '.join(roles)} role in {project.slug}")
    return member


def project_for_member(*, slug: str, user: Any) -> tuple[Project, ProjectMember]:
    project = project_get(slug=slug)
    return project, member_role_require(project=project, user=user)


def projects_of_user(*, user: Any) -> list[dict[str, Any]]:
    rows = ProjectMember.objects.filter(user=user).select_related("project").order_by("project__name")
    return [
        {
            "slug": m.project.slug,
            "name": m.project.name,
            "role": m.role,
            "modality": m.project.modality,
            "mode": m.project.mode,
        }
        for m in rows
    ]


def sample_media_url(sample: Sample) -> str | None:
    if sample.modality == "text":
        return None
    return f"/media/samples/{sample.id}?v={sample.content_hash[:12]}"


def sample_payload(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "modality": sample.modality,
        "url": sample_media_url(sample),
        "text": sample.text if sample.modality == "text" else None,
        "mime_type": sample.mime_type,
        "width": sample.width,
        "height": sample.height,
        "duration": sample.duration,
        "fps": sample.fps,
    }


def leases_payload(*, project: Project, leases: Iterable[Assignment]) -> dict[str, Any]:
    """What the labeling page needs to show a list of leases, samples in displayed order."""
    leases = list(leases)
    sample_ids = {int(sid) for a in leases for sid in a.display_order}
    comparison_ids = {a.comparison_id for a in leases}
    samples = {s.id: s for s in Sample.objects.filter(id__in=sample_ids).defer("metadata")}
    prompts = {
        cid: {"id": pid, "text": text}
        for cid, pid, text in Comparison.objects.filter(id__in=comparison_ids).values_list(
            "id", "prompt_id", "prompt__text"
        )
    }
    items = [
        {
            "assignment": a.id,
            "comparison": a.comparison_id,
            "expires_at": a.expires_at.isoformat(),
            "prompt": prompts[a.comparison_id],
            "samples": [sample_payload(samples[int(sid)]) for sid in a.display_order],
        }
        for a in leases
    ]
    return {
        "items": items,
        "options": {"tie": project.allow_tie, "both_bad": project.allow_both_bad},
        "aspects": project.aspects,
        "mode": project.mode,
    }


def annotator_progress(*, project: Project, annotator: Any) -> dict[str, Any]:
    mine = Assignment.objects.filter(project=project, annotator=annotator).aggregate(
        active=Count("id", filter=Q(status=Assignment.Status.ACTIVE, expires_at__gt=timezone.now())),
        skipped=Count("id", filter=Q(status=Assignment.Status.SKIPPED)),
    )
    judged = Judgment.objects.filter(project=project, annotator=annotator).count()
    totals = Comparison.objects.filter(project=project).aggregate(
        comparisons=Count("id"),
        complete=Count("id", filter=Q(status=Comparison.Status.COMPLETE)),
    )
    judgments = Judgment.objects.filter(project=project).count()
    available = (
        Comparison.objects.filter(
            project=project, status=Comparison.Status.OPEN, slots_taken__lt=F("overlap")
        )
        .exclude(assignments__annotator=annotator)
        .count()
    )
    return {
        "me": {
            "judged": judged,
            "skipped": mine["skipped"],
            "active_leases": mine["active"],
            "available": available,
        },
        "project": {
            "comparisons": totals["comparisons"],
            "complete": totals["complete"],
            "judgments": judgments,
        },
    }


def judgments_for_comparison(*, comparison: Comparison) -> QuerySet[Judgment]:
    return Judgment.objects.filter(comparison=comparison).order_by("created_at")
