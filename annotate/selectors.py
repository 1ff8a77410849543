"""Reads of the annotation domain ("the pull")."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet
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


def _from_row(model: Any, fields: Sequence[Any], values: Sequence[Any]) -> Any:
    converted = [
        f.from_db_value(v, None, connection) if hasattr(f, "from_db_value") else v
        for f, v in zip(fields, values, strict=True)
    ]
    return model.from_db("default", [f.attname for f in fields], converted)


def project_for_member(*, slug: str, user: Any) -> tuple[Project, ProjectMember]:
    """The project and the caller's membership in one query (plain SQL, no ORM query building).
    Non-members get NotFound; staff act as managers."""
    pf = Project._meta.concrete_fields
    mf = ProjectMember._meta.concrete_fields
    sql = (
        f"SELECT {', '.join(f'p.{f.column}' for f in pf)}, {', '.join(f'm.{f.column}' for f in mf)}"
        " FROM annotate_projectmember m JOIN annotate_project p ON p.id = m.project_id"
        " WHERE p.slug = %s AND m.user_id = %s"
    )
    with connection.cursor() as cur:
        cur.execute(sql, [slug, user.pk])
        row = cur.fetchone()
    if row is not None:
        project = _from_row(Project, pf, row[: len(pf)])
        member = _from_row(ProjectMember, mf, row[len(pf) :])
        member.project = project
        return project, member
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


def sample_payload(sample: Sample) -> dict[str, Any]:
    return _sample_dict({f: getattr(sample, f) for f in _SAMPLE_FIELDS})


_SAMPLE_FIELDS = ("id", "modality", "text", "mime_type", "width", "height", "duration", "fps", "content_hash")


def _sample_dict(row: dict[str, Any]) -> dict[str, Any]:
    media = row["modality"] != "text"
    return {
        "id": row["id"],
        "modality": row["modality"],
        "url": f"/media/samples/{row['id']}?v={row['content_hash'][:12]}" if media else None,
        "text": None if media else row["text"],
        "mime_type": row["mime_type"],
        "width": row["width"],
        "height": row["height"],
        "duration": row["duration"],
        "fps": row["fps"],
    }


def leases_payload(*, project: Project, leases: Iterable[Assignment]) -> dict[str, Any]:
    """What the labeling page needs to show a list of leases, samples in displayed order (built
    by ``rl_payload``, the same function that answers `next`)."""
    with connection.cursor() as cur:
        cur.execute("SELECT rl_payload(%s, %s)::text", [project.id, [a.id for a in leases]])
        (body,) = cur.fetchone() or ("{}",)
    payload: dict[str, Any] = json.loads(body)
    return payload


def annotator_progress(*, project: Project, annotator: Any) -> dict[str, Any]:
    mine = Assignment.objects.filter(project=project, annotator=annotator).aggregate(
        active=Count("id", filter=Q(status=Assignment.Status.ACTIVE, expires_at__gt=timezone.now())),
        skipped=Count("id", filter=Q(status=Assignment.Status.SKIPPED)),
    )
    judged = Judgment.objects.filter(project=project, annotator=annotator).count()
    totals = Comparison.objects.filter(project=project).aggregate(
        comparisons=Count("id"),
        complete=Count("id", filter=Q(status=Comparison.Status.COMPLETE)),
        stuck=Count("id", filter=_stuck_q(Project.objects.filter(id=project.id).values("id"))),
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
            "stuck": totals["stuck"],
        },
    }


def _stuck_q(projects: Any) -> Q:
    """Open comparisons that still want a judgment and that nobody active can be served any more:
    someone skipped them and every unpaused annotator already had them (nobody is served a
    comparison twice). Managers are not counted as labelers; they are the ones who must act.

    A condition on the comparison row, so it rides along in a count over the project. The skipped
    leases of ``projects`` (a queryset of project ids) are one uncorrelated subquery, read once
    through the small partial index ``assignment_skipped`` (migration 0008) and probed as a hash:
    the cost stays flat in the number of comparisons, and the per-row annotator check runs only
    for the few comparisons someone skipped."""
    skipped = Assignment.objects.filter(project__in=projects, status=Assignment.Status.SKIPPED).values(
        "comparison_id"
    )
    unserved = ProjectMember.objects.filter(
        project=OuterRef("project"), role=ProjectMember.Role.ANNOTATOR, paused=False
    ).exclude(
        Exists(Assignment.objects.filter(comparison=OuterRef(OuterRef("pk")), annotator=OuterRef("user")))
    )
    return Q(status=Comparison.Status.OPEN, slots_taken__lt=F("overlap"), id__in=skipped) & Q(
        ~Exists(unserved)
    )


def comparisons_stuck_counts(*, slugs: Sequence[str]) -> dict[str, int]:
    """Stuck comparisons (see ``_stuck_q``) per project slug, projects with none left out; one query."""
    rows = (
        Comparison.objects.filter(
            Q(project__slug__in=list(slugs))
            & _stuck_q(Project.objects.filter(slug__in=list(slugs)).values("id"))
        )
        .values("project__slug")
        .annotate(n=Count("id"))
    )
    return {row["project__slug"]: row["n"] for row in rows}


def judgments_for_comparison(*, comparison: Comparison) -> QuerySet[Judgment]:
    return Judgment.objects.filter(comparison=comparison).order_by("created_at")


def comparisons_open_pairs(*, project_id: int, created_after: Any = None) -> list[tuple[int, int, int]]:
    """The open, non-gold pairwise comparisons of a project (those active learning reorders), as
    (comparison id, lower sample id, higher sample id); only those created after
    ``created_after`` when it is given."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT c.id, min(cs.sample_id), max(cs.sample_id)
            FROM annotate_comparison c JOIN annotate_comparisonsample cs ON cs.comparison_id = c.id
            WHERE c.project_id = %s AND c.status = 'open' AND NOT c.is_gold
              AND (%s::timestamptz IS NULL OR c.created_at > %s::timestamptz)
            GROUP BY c.id HAVING count(*) = 2
            """,
            [project_id, created_after, created_after],
        )
        return [(int(r[0]), int(r[1]), int(r[2])) for r in cur.fetchall()]
