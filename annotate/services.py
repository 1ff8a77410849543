"""Writes of the annotation domain ("the push"). Views, tasks and commands call these.

Every function takes keyword-only arguments, checks the caller's permission where it acts for a
user, and leaves the database unchanged when it raises.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.core.files.base import ContentFile
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from annotate.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge
from annotate.media import MediaError, MediaInfo, MediaTooLarge, inspect_media, inspect_text
from annotate.models import (
    Assignment,
    Comparison,
    ComparisonSample,
    DatasetSnapshot,
    Generator,
    GeneratorVersion,
    Judgment,
    Modality,
    Project,
    ProjectMember,
    Prompt,
    Sample,
)
from annotate.selectors import member_role_require

UserLike = AbstractBaseUser

CHOICES = ("left", "right", "tie", "both_bad")


# --- Projects and members ------------------------------------------------------------------------
def project_create(
    *,
    creator: Any,
    slug: str,
    name: str,
    modality: str = "",
    instructions: str = "",
    allow_tie: bool = True,
    allow_both_bad: bool = True,
    aspects: Sequence[dict[str, str]] = (),
    mode: str = Project.Mode.PAIRWISE,
    k: int = 2,
    overlap: int = 1,
    gold_rate: float = 0.0,
    lease_seconds: int = 900,
    undo_seconds: int = 30,
) -> Project:
    """Create a project; the creator becomes its manager."""
    if not (creator.is_staff or creator.has_perm("annotate.add_project")):
        raise Forbidden("only staff or users with the add_project permission can create projects")
    if Project.objects.filter(slug=slug).exists():
        raise Conflict(f"a project with slug {slug!r} already exists", code="slug_taken")
    aspect_list = _validate_aspects(aspects)
    if mode == Project.Mode.PAIRWISE and k != 2:
        raise Invalid("pairwise projects compare exactly 2 outputs (k=2)")
    if not 2 <= k <= 16:
        raise Invalid("k must be between 2 and 16")
    if not 1 <= overlap <= 100:
        raise Invalid("overlap must be between 1 and 100")
    if not 0.0 <= gold_rate <= 1.0:
        raise Invalid("gold_rate must be between 0 and 1")
    if lease_seconds < 10:
        raise Invalid("lease_seconds must be at least 10")
    with transaction.atomic():
        project = Project.objects.create(
            slug=slug,
            name=name,
            modality=modality,
            instructions=instructions,
            allow_tie=allow_tie,
            allow_both_bad=allow_both_bad,
            aspects=aspect_list,
            mode=mode,
            k=k,
            overlap=overlap,
            gold_rate=gold_rate,
            lease_seconds=lease_seconds,
            undo_seconds=undo_seconds,
            created_by=creator,
        )
        ProjectMember.objects.create(project=project, user=creator, role=ProjectMember.Role.MANAGER)
    return project


def _validate_aspects(aspects: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for a in aspects:
        key = str(a.get("key", "")).strip()
        if not key or not key.replace("_", "").replace("-", "").isalnum():
            raise Invalid(f"aspect key {key!r} must be a non-empty identifier (letters, digits, _ or -)")
        if key in seen:
            raise Invalid(f"aspect key {key!r} appears twice")
        seen.add(key)
        out.append({"key": key, "label": str(a.get("label") or key)})
    return out


def project_member_set(
    *, project: Project, actor: Any, user: Any, role: str, paused: bool = False
) -> ProjectMember:
    """Add a member or change their role/paused flag. Managers only."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if role not in ProjectMember.Role.values:
        raise Invalid(f"role must be one of {ProjectMember.Role.values}")
    member, _ = ProjectMember.objects.update_or_create(
        project=project, user=user, defaults={"role": role, "paused": paused}
    )
    return member


def _require_member(*, project: Project, user: Any, member: ProjectMember | None) -> ProjectMember:
    """The caller's membership; reuses one the view already loaded for this project and user."""
    if member is not None and member.project_id == project.id and member.user_id == user.id:
        return member
    return member_role_require(project=project, user=user)


# --- Prompts, generators, samples ----------------------------------------------------------------
def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_get_or_create(*, project: Project, text: str, metadata: dict[str, Any] | None = None) -> Prompt:
    # Kept verbatim (whitespace included): TRL's implicit prompts end in a space, and a round trip
    # must give back the same strings.
    if not text.strip():
        raise Invalid("prompt text is empty")
    prompt, _ = Prompt.objects.get_or_create(
        project=project, text_hash=_text_hash(text), defaults={"text": text, "metadata": metadata or {}}
    )
    return prompt


def generator_version_get_or_create(*, generator: str, version: str = "") -> GeneratorVersion | None:
    generator = generator.strip()
    if not generator:
        return None
    gen, _ = Generator.objects.get_or_create(name=generator)
    gv, _ = GeneratorVersion.objects.get_or_create(generator=gen, name=version.strip() or "upload")
    return gv


@dataclass(frozen=True)
class SampleResult:
    sample: Sample
    created: bool


def _check_modality(project: Project, modality: str) -> None:
    if project.modality and project.modality != modality:
        raise Invalid(f"this project takes {project.modality} samples, not {modality}", code="wrong_modality")


def sample_create_media(
    *,
    project: Project,
    actor: Any,
    file: IO[bytes],
    filename: str,
    prompt: str,
    generator: str = "",
    generator_version: str = "",
    metadata: dict[str, Any] | None = None,
) -> SampleResult:
    """Validate an image/video upload (type sniffed from bytes) and store it as a sample.

    A file whose content already exists in the project returns the existing sample."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    try:
        info = inspect_media(file)
    except MediaTooLarge as exc:
        raise TooLarge(f"{filename}: {exc}", code="too_large") from exc
    except MediaError as exc:
        raise Invalid(f"{filename}: {exc}", code="bad_media") from exc
    _check_modality(project, info.modality)
    existing = Sample.objects.filter(project=project, content_hash=info.content_hash).first()
    if existing:
        return SampleResult(existing, False)
    with transaction.atomic():
        p = prompt_get_or_create(project=project, text=prompt)
        gv = generator_version_get_or_create(generator=generator, version=generator_version)
        sample = sample_build(project=project, prompt=p, gv=gv, info=info, metadata=metadata)
        file.seek(0)
        sample.media.save(f"upload.{info.extension}", ContentFile(file.read()), save=False)
        try:
            with transaction.atomic():
                sample.save()
        except IntegrityError:
            # Same bytes uploaded concurrently: the other request stored it.
            sample.media.delete(save=False)
            return SampleResult(Sample.objects.get(project=project, content_hash=info.content_hash), False)
    return SampleResult(sample, True)


def sample_build(
    *,
    project: Project,
    prompt: Prompt,
    gv: GeneratorVersion | None,
    info: MediaInfo,
    metadata: dict[str, Any] | None,
    text: str = "",
) -> Sample:
    """An unsaved Sample from validated media/text info; ``metadata`` wins over what the media
    inspection found (e.g. the codec)."""
    meta = dict(metadata or {})
    meta.update({k: v for k, v in info.extra.items() if k not in meta})
    return Sample(
        project=project,
        prompt=prompt,
        generator_version=gv,
        modality=info.modality,
        mime_type=info.mime_type,
        text=text,
        content_hash=info.content_hash,
        byte_size=info.byte_size,
        width=info.width,
        height=info.height,
        duration=info.duration,
        frames=info.frames,
        fps=info.fps,
        metadata=meta,
    )


def sample_create_texts(
    *, project: Project, actor: Any, items: Sequence[dict[str, Any]]
) -> list[SampleResult]:
    """Create text samples in one transaction: all or nothing."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    _check_modality(project, Modality.TEXT)
    if not items:
        raise Invalid("no samples given")
    results: list[SampleResult] = []
    with transaction.atomic():
        for i, item in enumerate(items):
            text = item.get("text")
            if not isinstance(text, str):
                raise Invalid(f"sample {i}: 'text' must be a string", details={"index": i})
            prompt_text = item.get("prompt")
            if not isinstance(prompt_text, str) or not prompt_text.strip():
                raise Invalid(f"sample {i}: 'prompt' must be a non-empty string", details={"index": i})
            try:
                info = inspect_text(text)
            except MediaTooLarge as exc:
                raise TooLarge(f"sample {i}: {exc}", details={"index": i}) from exc
            except MediaError as exc:
                raise Invalid(f"sample {i}: {exc}", details={"index": i}) from exc
            existing = Sample.objects.filter(project=project, content_hash=info.content_hash).first()
            if existing:
                results.append(SampleResult(existing, False))
                continue
            p = prompt_get_or_create(project=project, text=prompt_text)
            gv = generator_version_get_or_create(
                generator=str(item.get("generator") or ""), version=str(item.get("generator_version") or "")
            )
            sample = sample_build(
                project=project, prompt=p, gv=gv, info=info, metadata=item.get("metadata"), text=text
            )
            sample.save()
            results.append(SampleResult(sample, True))
    return results


# --- Comparisons ---------------------------------------------------------------------------------
def comparisons_create(
    *,
    project: Project,
    actor: Any | None,
    specs: Sequence[dict[str, Any]],
    origin: str = Comparison.Origin.EXPLICIT,
    origin_round: int | None = None,
) -> list[Comparison]:
    """Create comparisons from explicit sample lists, all or nothing.

    Each spec: ``{"samples": [id, ...], "priority": 0.0, "overlap": None, "gold_answer": None}``.
    ``actor=None`` is for internal callers (the loop, imports)."""
    if actor is not None:
        member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if not specs:
        raise Invalid("no comparisons given")
    all_ids = {int(sid) for spec in specs for sid in spec.get("samples", [])}
    samples = {s.id: s for s in Sample.objects.filter(project=project, id__in=all_ids)}
    rows: list[tuple[Comparison, list[int]]] = []
    for i, spec in enumerate(specs):
        ids = [int(x) for x in spec.get("samples", [])]
        if len(ids) != project.k:
            raise Invalid(
                f"comparison {i}: needs exactly {project.k} samples, got {len(ids)}", details={"index": i}
            )
        if len(set(ids)) != len(ids):
            raise Invalid(f"comparison {i}: a sample cannot be compared with itself", details={"index": i})
        missing = [sid for sid in ids if sid not in samples]
        if missing:
            raise NotFound(f"comparison {i}: samples {missing} are not in this project", details={"index": i})
        prompts = {samples[sid].prompt_id for sid in ids}
        if len(prompts) != 1:
            raise Invalid(f"comparison {i}: samples must share one prompt", details={"index": i})
        overlap = int(spec.get("overlap") or project.overlap)
        if not 1 <= overlap <= 100:
            raise Invalid(f"comparison {i}: overlap must be between 1 and 100", details={"index": i})
        gold = spec.get("gold_answer")
        c = Comparison(
            project=project,
            prompt_id=prompts.pop(),
            priority=float(spec.get("priority") or 0.0),
            origin=origin,
            origin_round=origin_round,
            overlap=overlap,
            is_gold=gold is not None,
            gold_answer=gold,
        )
        rows.append((c, ids))
    with transaction.atomic():
        Comparison.objects.bulk_create([c for c, _ in rows], batch_size=2000)
        ComparisonSample.objects.bulk_create(
            [
                ComparisonSample(comparison=c, sample_id=sid, prompt_id=c.prompt_id, position=pos)
                for c, ids in rows
                for pos, sid in enumerate(ids)
            ],
            batch_size=5000,
        )
    return [c for c, _ in rows]


def comparisons_create_random_pairs(
    *,
    project: Project,
    actor: Any | None,
    pairs_per_prompt: int,
    seed: int | None = None,
    priority: float = 0.0,
) -> list[Comparison]:
    """For each prompt, draw up to ``pairs_per_prompt`` distinct random pairs of its samples
    (from different generator versions when possible) that are not compared yet."""
    if actor is not None:
        member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if project.k != 2:
        raise Invalid("random pairs are for pairwise projects")
    if not 1 <= pairs_per_prompt <= 1000:
        raise Invalid("pairs_per_prompt must be between 1 and 1000")
    rng = random.Random(seed)
    by_prompt: dict[int, list[tuple[int, int | None]]] = {}
    for sid, pid, gv in Sample.objects.filter(project=project).values_list(
        "id", "prompt_id", "generator_version_id"
    ):
        by_prompt.setdefault(pid, []).append((sid, gv))
    existing: set[frozenset[int]] = set()
    pairs_q = ComparisonSample.objects.filter(comparison__project=project).values_list(
        "comparison_id", "sample_id"
    )
    current: dict[int, list[int]] = {}
    for cid, sid in pairs_q:
        current.setdefault(cid, []).append(sid)
    existing = {frozenset(v) for v in current.values()}
    specs: list[dict[str, Any]] = []
    for samples in by_prompt.values():
        candidates = [
            (a, b)
            for i, a in enumerate(samples)
            for b in samples[i + 1 :]
            if frozenset((a[0], b[0])) not in existing
        ]
        rng.shuffle(candidates)
        # Prefer pairs across generator versions: those are the informative ones.
        candidates.sort(key=lambda ab: ab[0][1] == ab[1][1] and ab[0][1] is not None)
        for a, b in candidates[:pairs_per_prompt]:
            pair = [a[0], b[0]]
            rng.shuffle(pair)
            specs.append({"samples": pair, "priority": priority})
    if not specs:
        raise Invalid("no new pairs: each prompt needs at least two samples not yet compared")
    return comparisons_create(project=project, actor=None, specs=specs, origin=Comparison.Origin.RANDOM)


# --- Assignment: handing out work ----------------------------------------------------------------
# Pick open comparisons, take a slot of each and lease them. SKIP LOCKED passes over rows that
# other annotators are taking right now. The display order is shuffled per lease (left/right
# randomised) and stored with it.
_PICK = """
picked AS (
    SELECT c.id, c.priority FROM annotate_comparison c
    WHERE c.project_id = %(project)s AND c.status = 'open' AND c.slots_taken < c.overlap
      AND c.id <> ALL(%(taken)s)
      AND NOT EXISTS (
          SELECT 1 FROM annotate_assignment a WHERE a.comparison_id = c.id AND a.annotator_id = %(user)s)
    ORDER BY c.priority DESC, c.id
    LIMIT {limit}
    FOR UPDATE OF c SKIP LOCKED
), bumped AS (
    UPDATE annotate_comparison c SET slots_taken = c.slots_taken + 1
    WHERE c.id = ANY(ARRAY(SELECT id FROM picked))  -- an index lookup whatever the LIMIT estimate
    RETURNING c.id, c.priority
), leased AS (
    INSERT INTO annotate_assignment
        (project_id, comparison_id, annotator_id, status, display_order, leased_at, expires_at)
    SELECT %(project)s, b.id, %(user)s, 'active',
        (SELECT jsonb_agg(cs.sample_id ORDER BY random()) FROM annotate_comparisonsample cs
          WHERE cs.comparison_id = b.id),
        %(now)s, %(expires)s
    FROM bumped b
    ORDER BY b.priority DESC, b.id
    RETURNING id, comparison_id, display_order, leased_at, expires_at
)
"""

# The caller's unexpired leases plus as many new ones as needed to make n, in one statement.
_NEXT_SQL = (
    """
WITH held AS (
    SELECT a.id, a.comparison_id, a.display_order, a.leased_at, a.expires_at
    FROM annotate_assignment a
    WHERE a.project_id = %(project)s AND a.annotator_id = %(user)s AND a.status = 'active'
      AND a.expires_at > %(now)s
    ORDER BY a.leased_at, a.id
    LIMIT %(n)s
), """
    + _PICK.format(
        limit="CASE WHEN %(paused)s THEN 0 ELSE GREATEST(%(n)s - (SELECT count(*) FROM held), 0) END"
    )
    + """
SELECT 0, * FROM held
UNION ALL
SELECT 1, * FROM leased
"""
)

# A second look for the slots SKIP LOCKED passed over (a fresh snapshot sees them once free).
_PICK_MORE_SQL = "WITH " + _PICK.format(limit="%(need)s") + "SELECT 1, * FROM leased"


def _json(value: Any) -> Any:
    # Django's psycopg setup hands raw-cursor jsonb back as text.
    return json.loads(value) if isinstance(value, str) else value


def _lock_annotator(*, project: Project, annotator: Any, member: ProjectMember) -> None:
    """Serialise one annotator's `next` calls in a project (two tabs, parallel prefetches), so
    they agree on the leases held. Its own statement: a statement's snapshot predates any lock
    it waits for inside itself."""
    with connection.cursor() as cur:
        if member.pk is not None:
            cur.execute("SELECT 1 FROM annotate_projectmember WHERE id = %s FOR UPDATE", [member.pk])
        else:  # staff acting without a membership row
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [project.id % 2**31, annotator.id % 2**31])


def assignment_next(
    *,
    project: Project,
    annotator: Any,
    n: int = 1,
    now: datetime | None = None,
    member: ProjectMember | None = None,
    member_locked: bool = False,
) -> list[Assignment]:
    """Return up to ``n`` leases for ``annotator``: their unexpired active leases first, then new
    ones. Concurrent callers never get the same slot (row locks with SKIP LOCKED), and nobody
    is ever handed a comparison they were handed before. Parallel calls of one annotator are
    serialised on their membership row (``member_locked``: the caller already holds that lock
    in the current transaction)."""
    if not 1 <= n <= 20:
        raise Invalid("n must be between 1 and 20")
    member = _require_member(project=project, user=annotator, member=member)
    now = now or timezone.now()
    params: dict[str, Any] = {
        "project": project.id,
        "user": annotator.id,
        "n": n,
        "now": now,
        "expires": now + timedelta(seconds=project.lease_seconds),
        "paused": member.paused,
        "taken": [],
    }

    def lease(row: tuple[Any, ...]) -> Assignment:
        return Assignment(
            id=row[1],
            project=project,
            comparison_id=row[2],
            annotator=annotator,
            status=Assignment.Status.ACTIVE,
            display_order=_json(row[3]),
            leased_at=row[4],
            expires_at=row[5],
        )

    with transaction.atomic(savepoint=False), connection.cursor() as cur:
        if not member_locked:
            _lock_annotator(project=project, annotator=annotator, member=member)
        cur.execute(_NEXT_SQL, params)
        rows = cur.fetchall()
        held = [lease(r) for r in rows if r[0] == 0]
        fresh = [lease(r) for r in rows if r[0] == 1]
        for _ in range(2):
            need = n - len(held) - len(fresh)
            if need <= 0 or member.paused:
                break
            params.update(need=need, taken=[a.comparison_id for a in fresh])
            cur.execute(_PICK_MORE_SQL, params)
            fresh += [lease(r) for r in cur.fetchall()]
    held.sort(key=lambda a: (a.leased_at, a.id or 0))
    fresh.sort(key=lambda a: a.id or 0)
    return held + fresh


def assignment_skip(*, project: Project, annotator: Any, assignment_id: int) -> Assignment:
    """Give a lease back without judging; the comparison is never served to this annotator again."""
    member_role_require(project=project, user=annotator)
    with transaction.atomic():
        a = _lease_for_update(project=project, annotator=annotator, assignment_id=assignment_id)
        if a.status != Assignment.Status.ACTIVE:
            raise Conflict(f"this lease is already {a.status}", code="lease_released")
        a.status = Assignment.Status.SKIPPED
        a.finished_at = timezone.now()
        a.save(update_fields=["status", "finished_at"])
        Comparison.objects.filter(id=a.comparison_id).update(slots_taken=F("slots_taken") - 1)
    return a


def _lease_for_update(*, project: Project, annotator: Any, assignment_id: int) -> Assignment:
    a = Assignment.objects.select_for_update().filter(id=assignment_id, project=project).first()
    if a is None:
        raise NotFound(f"no lease {assignment_id} in project {project.slug}")
    if a.annotator_id != annotator.id:
        raise Forbidden("this comparison is not leased to you", code="not_your_lease")
    return a


_EXPIRE_SQL = """
WITH expired AS (
    UPDATE annotate_assignment SET status = 'expired', finished_at = %(now)s
    WHERE id IN (
        SELECT id FROM annotate_assignment WHERE status = 'active' AND expires_at <= %(now)s
        ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
    RETURNING comparison_id
), counts AS (SELECT comparison_id, count(*) AS n FROM expired GROUP BY comparison_id)
UPDATE annotate_comparison c SET slots_taken = c.slots_taken - counts.n
FROM counts WHERE c.id = counts.comparison_id
"""


def leases_expire(*, now: datetime | None = None, batch: int = 5000) -> int:
    """Return expired leases' slots to the pool. Safe to run concurrently and repeatedly."""
    now = now or timezone.now()
    total = 0
    while True:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(_EXPIRE_SQL, {"now": now, "limit": batch})
            n = cur.rowcount
        total += n
        if n < batch:
            return total


# --- Judgments -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubmitResult:
    judgment: Judgment
    created: bool


_LEASE_SQL = """
SELECT a.annotator_id, a.status, a.display_order, a.comparison_id,
       (SELECT array_agg(cs.sample_id ORDER BY cs.position) FROM annotate_comparisonsample cs
         WHERE cs.comparison_id = a.comparison_id)
FROM annotate_assignment a WHERE a.id = %s AND a.project_id = %s
FOR UPDATE OF a
"""

# One round trip for the three writes of a judgment; the hot path of labeling.
_RECORD_SQL = """
WITH j AS (
    INSERT INTO annotate_judgment (project_id, comparison_id, annotator_id, assignment_id, outcome,
        winner_id, ranking, aspects, rationale, artifacts, displayed_order, time_spent_ms, idempotency_key,
        source, created_at)
    VALUES (%(project)s, %(comparison)s, %(annotator)s, %(assignment)s, %(outcome)s, %(winner)s,
        %(ranking)s, %(aspects)s, %(rationale)s, %(artifacts)s, %(displayed)s, %(time_spent)s, %(key)s,
        %(source)s, %(now)s)
    ON CONFLICT (annotator_id, idempotency_key) WHERE NOT (idempotency_key = '') DO NOTHING
    RETURNING id
), a AS (
    UPDATE annotate_assignment SET status = 'done', finished_at = %(now)s
    WHERE id = %(assignment)s AND EXISTS (SELECT 1 FROM j)
), c AS (
    UPDATE annotate_comparison SET judgments_count = judgments_count + 1,
        status = CASE WHEN judgments_count + 1 >= overlap AND status = 'open' THEN 'complete' ELSE status END
    WHERE id = %(comparison)s AND EXISTS (SELECT 1 FROM j)
)
SELECT id FROM j
"""


def judgment_submit(
    *,
    project: Project,
    annotator: Any,
    assignment_id: int,
    choice: str | None = None,
    ranking: Sequence[int] | None = None,
    aspects: dict[str, str] | None = None,
    rationale: str = "",
    artifacts: Sequence[dict[str, Any]] | None = None,
    time_spent_ms: int = 0,
    idempotency_key: str = "",
    source: str = Judgment.Source.UI,
    member: ProjectMember | None = None,
) -> SubmitResult:
    """Record a judgment on a lease the annotator holds.

    A repeated ``idempotency_key`` returns the first judgment and writes nothing. ``member`` is
    the caller's membership when the view already loaded it (saves a query)."""
    _require_member(project=project, user=annotator, member=member)
    if not 0 <= time_spent_ms <= 86_400_000:
        raise Invalid("time_spent_ms must be between 0 and 86400000")
    if len(rationale) > 10_000:
        raise Invalid("rationale is longer than 10000 characters")
    # No savepoint: inside a caller's transaction (submit + next) this adds no round trips.
    with transaction.atomic(savepoint=False), connection.cursor() as cur:
        cur.execute(_LEASE_SQL, [assignment_id, project.id])
        row = cur.fetchone()
        if row is None:
            raise NotFound(f"no lease {assignment_id} in project {project.slug}")
        holder, status, display_order, comparison_id, canonical = row
        if holder != annotator.id:
            raise Forbidden("this comparison is not leased to you", code="not_your_lease")
        if status == Assignment.Status.DONE:
            prior = Judgment.objects.filter(assignment_id=assignment_id).first()
            if prior is not None and idempotency_key and prior.idempotency_key == idempotency_key:
                return SubmitResult(prior, False)
            raise Conflict("you already judged this comparison", code="already_judged")
        if status != Assignment.Status.ACTIVE:
            raise Conflict(f"this lease was {status}; fetch a new comparison", code="lease_released")
        # Django's psycopg setup hands raw-cursor jsonb back as text.
        if isinstance(display_order, str):
            display_order = json.loads(display_order)
        shown = [int(x) for x in display_order]
        fields = _outcome_fields(project, canonical, shown, choice, ranking)
        judgment = Judgment(
            project=project,
            comparison_id=comparison_id,
            annotator=annotator,
            assignment_id=assignment_id,
            aspects=_map_aspects(project, canonical, shown, aspects or {}),
            rationale=rationale,
            artifacts=_check_artifacts(canonical, artifacts or []),
            displayed_order=shown,
            time_spent_ms=time_spent_ms,
            idempotency_key=idempotency_key,
            source=source,
            created_at=timezone.now(),
            **fields,
        )
        cur.execute(
            _RECORD_SQL,
            {
                "project": project.id,
                "comparison": comparison_id,
                "annotator": annotator.id,
                "assignment": assignment_id,
                "outcome": judgment.outcome,
                "winner": judgment.winner_id,
                "ranking": None if judgment.ranking is None else json.dumps(judgment.ranking),
                "aspects": json.dumps(judgment.aspects),
                "rationale": rationale,
                "artifacts": json.dumps(judgment.artifacts),
                "displayed": json.dumps(shown),
                "time_spent": time_spent_ms,
                "key": idempotency_key,
                "source": source,
                "now": judgment.created_at,
            },
        )
        inserted = cur.fetchone()
        if inserted is None:
            # The idempotency key was used before, on another lease: nothing was written.
            first = Judgment.objects.get(annotator=annotator, idempotency_key=idempotency_key)
            return _replay(first, assignment_id)
        judgment.id = inserted[0]
    return SubmitResult(judgment, True)


def _replay(first: Judgment, assignment_id: int) -> SubmitResult:
    if first.assignment_id is not None and first.assignment_id != assignment_id:
        raise Conflict(
            "this idempotency key was already used for another lease", code="idempotency_key_reused"
        )
    return SubmitResult(first, False)


def _outcome_fields(
    project: Project,
    canonical: list[int],
    shown: list[int],
    choice: str | None,
    ranking: Sequence[int] | None,
) -> dict[str, Any]:
    if project.mode == Project.Mode.RANKING:
        if ranking is None:
            raise Invalid("this project wants a full 'ranking' (sample ids, best first)")
        rank = [int(x) for x in ranking]
        if sorted(rank) != sorted(canonical):
            raise Invalid("ranking must list each sample of the comparison exactly once")
        return {"outcome": Judgment.Outcome.RANKING, "ranking": rank, "winner_id": rank[0]}
    if ranking is not None:
        raise Invalid("this is a pairwise project: send 'choice', not 'ranking'")
    outcome, winner = _map_choice(project, canonical, shown, choice, what="choice")
    return {"outcome": outcome, "winner_id": winner, "ranking": None}


def _map_choice(
    project: Project, canonical: list[int], shown: list[int], choice: str | None, *, what: str
) -> tuple[str, int | None]:
    if choice not in CHOICES:
        raise Invalid(f"{what} must be one of {', '.join(CHOICES)}")
    if choice == "tie":
        if not project.allow_tie:
            raise Invalid("this project does not allow ties", code="option_disabled")
        return Judgment.Outcome.TIE, None
    if choice == "both_bad":
        if not project.allow_both_bad:
            raise Invalid("this project does not allow 'both bad'", code="option_disabled")
        return Judgment.Outcome.BOTH_BAD, None
    winner = shown[0] if choice == "left" else shown[1]
    return (Judgment.Outcome.A if winner == canonical[0] else Judgment.Outcome.B), winner


def _map_aspects(
    project: Project, canonical: list[int], shown: list[int], aspects: dict[str, str]
) -> dict[str, str]:
    if not isinstance(aspects, dict):
        raise Invalid("aspects must be an object {aspect key: choice}")
    known = {a["key"] for a in project.aspects}
    unknown = set(aspects) - known
    if unknown:
        raise Invalid(f"unknown aspects {sorted(unknown)}; this project has {sorted(known)}")
    if aspects and project.mode != Project.Mode.PAIRWISE:
        raise Invalid("per-aspect outcomes are for pairwise projects")
    return {
        key: _map_choice(project, canonical, shown, value, what=f"aspect {key!r}")[0]
        for key, value in aspects.items()
    }


def _check_artifacts(canonical: list[int], artifacts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(artifacts):
        if not isinstance(item, dict) or int(item.get("sample", -1)) not in canonical:
            raise Invalid(f"artifact {i}: 'sample' must be one of the comparison's samples")
        tags = item.get("tags", [])
        regions = item.get("regions", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise Invalid(f"artifact {i}: 'tags' must be a list of strings")
        if not isinstance(regions, list) or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(v, int | float) for v in r)
            for r in regions
        ):
            raise Invalid(f"artifact {i}: 'regions' must be a list of [x, y, w, h]")
        out.append({"sample": int(item["sample"]), "tags": tags, "regions": regions})
    return out


def judgment_undo(*, project: Project, annotator: Any, now: datetime | None = None) -> Assignment:
    """Delete the annotator's last judgment in this project if it is younger than the project's
    undo window, and lease that comparison back to them."""
    member_role_require(project=project, user=annotator)
    now = now or timezone.now()
    with transaction.atomic():
        j = (
            Judgment.objects.select_for_update()
            .filter(project=project, annotator=annotator, assignment__isnull=False)
            .order_by("-created_at", "-id")
            .first()
        )
        if j is None:
            raise NotFound("you have no judgment to undo", code="nothing_to_undo")
        if now - j.created_at > timedelta(seconds=project.undo_seconds):
            raise Conflict(
                f"your last judgment is older than {project.undo_seconds} s and can no longer be undone",
                code="undo_window_passed",
            )
        a = Assignment.objects.select_for_update().get(id=j.assignment_id or 0)
        if a.status != Assignment.Status.DONE:
            raise Conflict("that judgment was already undone", code="nothing_to_undo")
        comparison_id = j.comparison_id
        j.delete()
        a.status = Assignment.Status.ACTIVE
        a.finished_at = None
        a.leased_at = now
        a.expires_at = now + timedelta(seconds=project.lease_seconds)
        a.save(update_fields=["status", "finished_at", "leased_at", "expires_at"])
        with connection.cursor() as cur:
            cur.execute(
                "UPDATE annotate_comparison SET judgments_count = judgments_count - 1,"
                " status = CASE WHEN status = 'complete' THEN 'open' ELSE status END WHERE id = %s",
                [comparison_id],
            )
    return a


# --- Dataset snapshots ---------------------------------------------------------------------------
def snapshot_create(
    *, project: Project, actor: Any, spec: Any, name: str = "", build_now: bool = False, dispatch: bool = True
) -> DatasetSnapshot:
    """Record a snapshot request (managers only) and queue its build on Celery; ``build_now``
    builds it in this process instead (the CLI); ``dispatch=False`` leaves the build to the caller
    (a job that builds the snapshot it trains on)."""
    from annotate import exports

    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if spec.aspect is not None and spec.aspect not in {a["key"] for a in project.aspects}:
        raise Invalid(f"unknown aspect {spec.aspect!r}")
    expected = exports.count_judgments(project=project, spec=spec)
    snap = DatasetSnapshot.objects.create(
        project=project, name=name, spec=spec.as_dict(), rows_expected=expected, created_by=actor
    )
    if build_now:
        snapshot_build(snapshot_id=snap.id)
        snap.refresh_from_db()
    elif dispatch:
        from annotate.tasks import build_snapshot

        transaction.on_commit(lambda: build_snapshot.delay(snap.id))
    return snap


def snapshot_progress_key(snapshot_id: int) -> str:
    return f"snapshot:{snapshot_id}:rows"


def snapshot_build(*, snapshot_id: int, progress: Any = None) -> DatasetSnapshot:
    """Write a snapshot's file once. Safe to call again: a built snapshot is never rewritten."""
    import tempfile

    from django.core.files import File

    from annotate import exports

    with transaction.atomic():
        snap = DatasetSnapshot.objects.select_for_update().select_related("project").get(id=snapshot_id)
        if snap.status in (DatasetSnapshot.Status.DONE, DatasetSnapshot.Status.RUNNING):
            return snap
        snap.status = DatasetSnapshot.Status.RUNNING
        snap.save(update_fields=["status"])
    spec_dict = dict(snap.spec)
    spec = exports.spec_from_dict(spec_dict)

    def report(rows: int) -> None:
        # The export reads inside its own snapshot transaction, so progress goes to the cache,
        # where the API reads it while the build runs.
        cache.set(snapshot_progress_key(snap.id), rows, timeout=24 * 3600)
        if progress is not None:
            progress(rows)

    try:
        with tempfile.TemporaryFile() as tmp:
            rows, digest, size = exports.write(project=snap.project, spec=spec, out=tmp, progress=report)
            tmp.seek(0)
            snap.file.save(
                f"{snap.project.slug}-{spec.schema}-{digest[:12]}.{spec.format}", File(tmp), save=False
            )
    except Exception as exc:
        DatasetSnapshot.objects.filter(id=snap.id).update(
            status=DatasetSnapshot.Status.FAILED,
            error=f"{type(exc).__name__}: {exc}",
            finished_at=timezone.now(),
        )
        raise
    DatasetSnapshot.objects.filter(id=snap.id).update(
        status=DatasetSnapshot.Status.DONE,
        row_count=rows,
        rows_written=rows,
        sha256=digest,
        byte_size=size,
        file=snap.file.name,
        finished_at=timezone.now(),
    )
    snap.refresh_from_db()
    return snap
