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
    """The open, non-gold pairwise comparisons of a project whose priority is not fixed (those
    active learning reorders), as (comparison id, lower sample id, higher sample id); only those
    created after ``created_after`` when it is given."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT c.id, min(cs.sample_id), max(cs.sample_id)
            FROM annotate_comparison c JOIN annotate_comparisonsample cs ON cs.comparison_id = c.id
            WHERE c.project_id = %s AND c.status = 'open' AND NOT c.is_gold AND NOT c.priority_fixed
              AND (%s::timestamptz IS NULL OR c.created_at > %s::timestamptz)
            GROUP BY c.id HAVING count(*) = 2
            """,
            [project_id, created_after, created_after],
        )
        return [(int(r[0]), int(r[1]), int(r[2])) for r in cur.fetchall()]


def leaderboard_games(
    *, project: Project, aspect: str | None = None, comparisons: Sequence[int] | None = None
) -> tuple[list[int], Any]:
    """The judged games between generator versions in ``project`` (``annotate.leaderboard.Games``)
    and the version ids they index: pairs whose two outputs come from two different known versions.
    ``aspect``: that aspect's verdicts instead of the overall ones. ``comparisons``: only these."""
    import numpy as np

    from annotate.leaderboard import Games
    from annotate.models import ComparisonSample

    entries = ComparisonSample.objects.filter(comparison__project=project)
    judged = Judgment.objects.filter(project=project)
    if comparisons is not None:
        entries = entries.filter(comparison_id__in=list(comparisons))
        judged = judged.filter(comparison_id__in=list(comparisons))
    order: dict[int, list[int]] = {}
    version_of: dict[int, int | None] = {}
    for cid, sid, vid in entries.order_by("comparison_id", "position").values_list(
        "comparison_id", "sample_id", "sample__generator_version_id"
    ):
        order.setdefault(cid, []).append(sid)
        version_of[sid] = vid
    index: dict[int, int] = {}
    gi: list[int] = []
    gj: list[int] = []
    gs: list[float] = []

    def game(a: int, b: int, score: float) -> None:
        va, vb = version_of.get(a), version_of.get(b)
        if va is None or vb is None or va == vb:
            return  # an output of no known version, or a version against itself: no information
        gi.append(index.setdefault(va, len(index)))
        gj.append(index.setdefault(vb, len(index)))
        gs.append(score)

    scores = {"a": 1.0, "b": 0.0, "tie": 0.5}
    for cid, outcome, ranking, aspects in judged.values_list(
        "comparison_id", "outcome", "ranking", "aspects"
    ):
        samples = order.get(cid, [])
        verdict = (aspects or {}).get(aspect) if aspect else outcome
        if verdict == "ranking" and not aspect and ranking:
            ranked = [int(s) for s in ranking]
            for x in range(len(ranked)):
                for y in range(x + 1, len(ranked)):
                    game(ranked[x], ranked[y], 1.0)
        elif verdict in scores and len(samples) == 2:
            game(samples[0], samples[1], scores[verdict])
    versions = sorted(index, key=index.__getitem__)
    games = Games(len(versions), np.array(gi, dtype=np.int64), np.array(gj, dtype=np.int64), np.array(gs))
    return versions, games


def leaderboard(
    *, project: Project, aspect: str | None = None, rounds: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """Generator versions of ``project`` ranked by Bradley-Terry rating from human judgments (ties
    as half wins), best first, each with its 95% bootstrap interval, games, wins and ties."""
    import numpy as np

    from annotate.leaderboard import bootstrap_intervals, bt_fit, elo
    from annotate.models import GeneratorVersion

    versions, games = leaderboard_games(project=project, aspect=aspect)
    if not versions:
        return []
    theta = bt_fit(games)
    low, high = bootstrap_intervals(games, rounds=rounds, seed=seed)
    played = np.bincount(games.i, minlength=games.n) + np.bincount(games.j, minlength=games.n)
    wins = np.bincount(games.i, games.s == 1.0, games.n) + np.bincount(games.j, games.s == 0.0, games.n)
    ties = np.bincount(games.i, games.s == 0.5, games.n) + np.bincount(games.j, games.s == 0.5, games.n)
    rows = {v.id: v for v in GeneratorVersion.objects.filter(id__in=versions).select_related("generator")}
    out = [
        {
            "version": vid,
            "generator": rows[vid].generator.name,
            "name": rows[vid].name,
            "rating": round(float(elo(theta)[k]), 1),
            "ci_low": round(float(elo(low)[k]), 1),
            "ci_high": round(float(elo(high)[k]), 1),
            "games": int(played[k]),
            "wins": int(wins[k]),
            "ties": int(ties[k]),
        }
        for k, vid in enumerate(versions)
    ]
    return sorted(out, key=lambda r: (-r["rating"], r["version"]))
