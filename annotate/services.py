"""Writes of the annotation domain ("the push"). Views, tasks and commands call these.

Every function takes keyword-only arguments, checks the caller's permission where it acts for a
user, and leaves the database unchanged when it raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.core.files.base import ContentFile
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from annotate import tasks
from annotate.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError, TooLarge, Unavailable
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
from annotate.validation import as_id, check_json, clean_text

UserLike = AbstractBaseUser
log = logging.getLogger(__name__)

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
    slug = clean_text(slug, field="slug", max_length=80)
    if not slug or not all(c.isascii() and (c.isalnum() or c in "-_") for c in slug):
        raise Invalid("slug: letters, digits, - or _ only")
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
    if not 10 <= lease_seconds <= 7 * 24 * 3600:
        raise Invalid("lease_seconds must be between 10 and 604800 (a week)")
    if not 0 <= undo_seconds <= 3600:
        raise Invalid("undo_seconds must be between 0 and 3600")
    name = clean_text(name, field="name", max_length=200, strip=True)
    if not name:
        raise Invalid("name: must not be empty")
    instructions = clean_text(instructions, field="instructions", max_length=100_000)
    try:
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
    except IntegrityError as exc:  # the same slug created concurrently
        raise Conflict(f"a project with slug {slug!r} already exists", code="slug_taken") from exc
    return project


def _validate_aspects(aspects: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for a in aspects:
        if not isinstance(a, dict):
            raise Invalid("each aspect must be an object {key, label}")
        key = clean_text(str(a.get("key", "")), field="aspect key", max_length=40, strip=True)
        if (
            not key
            or not key.replace("_", "").replace("-", "").isascii()
            or not key.replace("_", "").replace("-", "").isalnum()
        ):
            raise Invalid(f"aspect key {key!r} must be a non-empty identifier (letters, digits, _ or -)")
        if key in seen:
            raise Invalid(f"aspect key {key!r} appears twice")
        seen.add(key)
        label = clean_text(str(a.get("label") or key), field="aspect label", max_length=200, strip=True)
        out.append({"key": key, "label": label or key})
    if len(out) > 20:
        raise Invalid("at most 20 aspects")
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


# --- Prompts, generators, samples ----------------------------------------------------------------
def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_get_or_create(*, project: Project, text: str, metadata: dict[str, Any] | None = None) -> Prompt:
    # Kept verbatim (whitespace included): TRL's implicit prompts end in a space, and a round trip
    # must give back the same strings.
    text = clean_text(text, field="prompt")
    if not text.strip():
        raise Invalid("prompt text is empty")
    check_json(metadata or {}, field="prompt metadata")
    prompt, _ = Prompt.objects.get_or_create(
        project=project, text_hash=_text_hash(text), defaults={"text": text, "metadata": metadata or {}}
    )
    return prompt


@dataclass(frozen=True)
class PromptIds:
    """What ``prompts_get_or_create`` found: each text's prompt id, and which of those ids it
    created (nothing can be stored under those yet, so callers skip looking)."""

    ids: dict[str, int]
    created: frozenset[int]


def prompt_key(text: str) -> str:
    """The hash a prompt with this text is stored under, after the checks every prompt passes;
    no database (the import computes it in its reader thread)."""
    value = clean_text(text, field="prompt")
    if not value.strip():
        raise Invalid("prompt text is empty")
    return _text_hash(value)


def prompts_get_or_create(
    *, project: Project, texts: Sequence[str], keys: Sequence[str] | None = None
) -> PromptIds:
    """Ids of the project's prompts with these texts (the same rules as ``prompt_get_or_create``),
    creating the missing ones: one insert and at most one lookup for the lot (imports write
    thousands a chunk; a model instance each would cost more than the database does). ``keys``:
    each text's ``prompt_key``, when the caller has computed them already."""
    if keys is not None and len(keys) != len(texts):
        raise ValueError("one key per text")
    hashed: dict[str, str] = {}  # text -> hash
    by_hash: dict[str, str] = {}  # hash -> text
    for i, text in enumerate(texts):
        if text not in hashed:
            hashed[text] = h = prompt_key(text) if keys is None else keys[i]
            by_hash[h] = text
    table = connection.ops.quote_name(Prompt._meta.db_table)
    # No savepoint inside a caller's transaction: a failure here fails the caller's too.
    with transaction.atomic(savepoint=False), connection.cursor() as cur:
        raw = cur.cursor  # psycopg's own, for COPY
        # Texts go by COPY into a staging table: adapting a list of thousands of long texts to an
        # array parameter costs more than the insert. Insert first and look up only what was
        # there already: an import's prompts are mostly new.
        raw.execute(
            "CREATE TEMP TABLE IF NOT EXISTS rl_prompt_stage (text text, text_hash text) ON COMMIT DROP"
        )
        raw.execute("TRUNCATE rl_prompt_stage")
        with raw.copy("COPY rl_prompt_stage (text, text_hash) FROM STDIN") as cp:
            for h, value in by_hash.items():
                cp.write_row((value, h))
        # ON CONFLICT: the prompt is stored already, or another session adds it meanwhile.
        cur.execute(
            f"INSERT INTO {table} (project_id, text, text_hash, metadata, created_at)"
            " SELECT %s, s.text, s.text_hash, '{}'::jsonb, %s FROM rl_prompt_stage s"
            " ON CONFLICT DO NOTHING RETURNING text_hash, id",
            [project.id, timezone.now()],
        )
        ids: dict[str, int] = dict(cur.fetchall())
        created = frozenset(ids.values())
        rest = [h for h in by_hash if h not in ids]
        if rest:
            # Hashes are hex, so one comma-joined string: cheaper to send than an array.
            cur.execute(
                f"SELECT text_hash, id FROM {table} WHERE project_id = %s"
                " AND text_hash = ANY(string_to_array(%s, ','))",
                [project.id, ",".join(rest)],
            )
            ids.update(cur.fetchall())
    return PromptIds(ids={text: ids[h] for text, h in hashed.items()}, created=created)


def generator_version_get_or_create(*, generator: str, version: str = "") -> GeneratorVersion | None:
    generator = clean_text(generator, field="generator", max_length=200, strip=True)
    version = clean_text(version, field="generator_version", max_length=200, strip=True)
    if not generator:
        return None
    gen, _ = Generator.objects.get_or_create(name=generator)
    gv, _ = GeneratorVersion.objects.get_or_create(generator=gen, name=version.strip() or "upload")
    return gv


def generator_version_register(
    *, generator: str, version: str, checkpoint: str, metadata: dict[str, Any] | None = None
) -> GeneratorVersion:
    """A generator version that is a model we run (not uploaded outputs): ``checkpoint`` is its
    directory. Registering the same (generator, version) again updates the checkpoint and metadata
    (a resumed RL job re-registers the checkpoints it had written)."""
    generator = clean_text(generator, field="generator", max_length=200, strip=True)
    version = clean_text(version, field="generator_version", max_length=200, strip=True)
    if not generator or not version:
        raise Invalid("generator and version are required")
    check_json(metadata or {}, field="generator version metadata")
    gen, _ = Generator.objects.get_or_create(name=generator)
    gv, _ = GeneratorVersion.objects.update_or_create(
        generator=gen,
        name=version,
        defaults={"checkpoint": checkpoint, "is_external": False, "metadata": metadata or {}},
    )
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
    actor: Any | None,
    file: IO[bytes],
    filename: str,
    prompt: str,
    generator: str = "",
    generator_version: str = "",
    metadata: dict[str, Any] | None = None,
) -> SampleResult:
    """Validate an image/video upload (type sniffed from bytes) and store it as a sample.

    A file whose content already exists in the project returns the existing sample. ``actor=None``
    is for internal callers (a sampling job storing what a generator rendered)."""
    if actor is not None:
        member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    try:
        info = inspect_media(file)
    except MediaTooLarge as exc:
        raise TooLarge(f"{filename}: {exc}", code="too_large") from exc
    except MediaError as exc:
        raise Invalid(f"{filename}: {exc}", code="bad_media") from exc
    _check_modality(project, info.modality)
    existing = Sample.objects.filter(
        project=project, prompt__text=prompt, content_hash=info.content_hash
    ).first()
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
            return SampleResult(
                Sample.objects.get(project=project, prompt=p, content_hash=info.content_hash), False
            )
    return SampleResult(sample, True)


def with_media_extra(meta: dict[str, Any], info: MediaInfo) -> dict[str, Any]:
    """``meta`` with what the media inspection found (e.g. the codec) under the keys it does not
    set itself; ``meta`` wins. Changes and returns ``meta``."""
    for k, v in info.extra.items():
        meta.setdefault(k, v)
    return meta


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
    meta = with_media_extra(dict(check_json(metadata or {}, field="metadata")), info)
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
    *, project: Project, actor: Any | None, items: Sequence[dict[str, Any]]
) -> list[SampleResult]:
    """Create text samples in one transaction: all or nothing. ``actor=None`` is for internal
    callers (a sampling job storing what a generator wrote)."""
    if actor is not None:
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
            text = clean_text(text, field=f"sample {i}: text")
            try:
                info = inspect_text(text)
            except MediaTooLarge as exc:
                raise TooLarge(f"sample {i}: {exc}", details={"index": i}) from exc
            except MediaError as exc:
                raise Invalid(f"sample {i}: {exc}", details={"index": i}) from exc
            p = prompt_get_or_create(project=project, text=prompt_text)
            existing = Sample.objects.filter(
                project=project, prompt=p, content_hash=info.content_hash
            ).first()
            if existing:
                results.append(SampleResult(existing, False))
                continue
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

    Each spec: ``{"samples": [id, ...], "priority": 0.0, "overlap": None, "gold_answer": None}``,
    and ``"priority_fixed": True`` for a priority active learning must leave alone.
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
            priority_fixed=bool(spec.get("priority_fixed", False)),
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
        for a, b in _random_pairs(samples, pairs_per_prompt, existing, rng):
            pair = [a, b]
            rng.shuffle(pair)
            specs.append({"samples": pair, "priority": priority})
    if not specs:
        raise Invalid("no new pairs: each prompt needs at least two samples not yet compared")
    return comparisons_create(project=project, actor=None, specs=specs, origin=Comparison.Origin.RANDOM)


def _same_version(a: tuple[int, int | None], b: tuple[int, int | None]) -> bool:
    return a[1] == b[1] and a[1] is not None


def _random_pairs(
    samples: Sequence[tuple[int, int | None]], n: int, existing: set[frozenset[int]], rng: random.Random
) -> list[tuple[int, int]]:
    """Up to ``n`` distinct random pairs of ``samples`` (id, generator version) not in ``existing``,
    pairs across generator versions first (they are the informative ones).

    A prompt with m samples has m(m-1)/2 pairs; listing them all is quadratic (3,000 samples: 4.5 M
    pairs). Small prompts are enumerated; large ones are sampled by rejection, which needs about n
    draws while most pairs are still free, and stops after a bounded number of draws otherwise."""
    m = len(samples)
    if m < 2:
        return []
    total = m * (m - 1) // 2
    if total <= 4 * n + 256:
        candidates = [
            (a, b)
            for i, a in enumerate(samples)
            for b in samples[i + 1 :]
            if frozenset((a[0], b[0])) not in existing
        ]
        rng.shuffle(candidates)
        candidates.sort(key=lambda ab: _same_version(*ab))
        return [(a[0], b[0]) for a, b in candidates[:n]]
    chosen: list[tuple[int, int]] = []
    taken: set[frozenset[int]] = set()
    several_versions = len({gv for _, gv in samples}) > 1 or any(gv is None for _, gv in samples)
    # Two phases: cross-version pairs only, then any pair; each with a bounded number of draws.
    for cross_only in (True, False) if several_versions else (False,):
        draws = 0
        while len(chosen) < n and draws < 30 * n + 100:
            draws += 1
            i, j = rng.sample(range(m), 2)
            a, b = samples[i], samples[j]
            if cross_only and _same_version(a, b):
                continue
            key = frozenset((a[0], b[0]))
            if key in existing or key in taken:
                continue
            taken.add(key)
            chosen.append((a[0], b[0]))
    return chosen


# --- Labeling: the hot path runs in PostgreSQL -----------------------------------------------------
# `next` and `submit` are one statement each: the functions of migration 0005 (rl_next, rl_submit,
# rl_leases, ...) check the caller's membership, serialise their parallel requests, hand out
# leases with FOR UPDATE SKIP LOCKED, record the judgment and build the page's JSON. They are the
# only implementation of these rules.
_SQL_ERRORS: dict[str, type[ServiceError]] = {
    "RL400": Invalid,
    "RL403": Forbidden,
    "RL404": NotFound,
    "RL409": Conflict,
}


def _labeling_call(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one labeling function and return its rows; its RLxxx errors become ServiceErrors.

    On its own (autocommit) the statement is its own transaction: one round trip. Inside a
    caller's transaction it runs in a savepoint, so a refusal leaves that transaction usable."""
    try:
        if connection.in_atomic_block:
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        with connection.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    except DatabaseError as exc:
        diag = getattr(exc.__cause__, "diag", None)
        error = _SQL_ERRORS.get(getattr(diag, "sqlstate", None) or "")
        if error is None or diag is None:
            raise
        raise error(diag.message_primary or "refused", code=diag.message_hint or None) from None


def _is_staff(user: Any) -> bool:
    return bool(getattr(user, "is_staff", False))


def _json(value: Any) -> Any:
    # Django's psycopg setup hands raw-cursor jsonb back as text.
    return json.loads(value) if isinstance(value, str) else value


def labeling_next(*, slug: str, annotator: Any, n: int = 1, now: datetime | None = None) -> str:
    """Up to ``n`` leases for ``annotator`` in project ``slug``, as the labeling page's JSON text
    (items with samples in displayed order, the project's options): their unexpired active leases
    first, then new ones.

    Concurrent callers never get the same slot (row locks with SKIP LOCKED); nobody is ever handed
    a comparison they were handed before; paused annotators get only the leases they hold. One
    annotator's parallel calls are serialised by an advisory lock on (project, annotator).
    Non-members: NotFound."""
    if not 1 <= n <= 20:
        raise Invalid("n must be between 1 and 20")
    rows = _labeling_call(
        "SELECT rl_next(%s, %s, %s, %s, %s)::text",
        [slug, annotator.id, _is_staff(annotator), n, now or timezone.now()],
    )
    return str(rows[0][0])


def assignment_next(
    *, project: Project, annotator: Any, n: int = 1, now: datetime | None = None
) -> list[Assignment]:
    """The leases of ``labeling_next`` as rows, for Python callers (scripts, tests)."""
    if not 1 <= n <= 20:
        raise Invalid("n must be between 1 and 20")
    rows = _labeling_call(
        "SELECT id, comparison_id, display_order, leased_at, expires_at FROM rl_next_leases(%s, %s, %s, %s, %s)",
        [project.slug, annotator.id, _is_staff(annotator), n, now or timezone.now()],
    )
    return [
        Assignment(
            id=r[0],
            project=project,
            comparison_id=r[1],
            annotator=annotator,
            status=Assignment.Status.ACTIVE,
            display_order=_json(r[2]),
            leased_at=r[3],
            expires_at=r[4],
        )
        for r in rows
    ]


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


@dataclass(frozen=True)
class Submitted:
    """What ``labeling_submit`` did: ``created`` is false for an idempotent replay; ``body`` is the
    response's JSON text (the judgment, and the next leases when asked for)."""

    created: bool
    judgment_id: int
    body: str


def _check_artifacts(artifacts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shape of artifact flags; that each names a sample of the comparison is checked in SQL."""
    out = []
    for i, item in enumerate(artifacts):
        sample = item.get("sample") if isinstance(item, dict) else None
        sample = as_id(sample)
        if sample is None:
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
        out.append({"sample": sample, "tags": tags, "regions": regions})
    return out


def labeling_submit(
    *,
    slug: str,
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
    next_n: int = 0,
    now: datetime | None = None,
) -> Submitted:
    """Record a judgment on a lease the annotator holds and, with ``next_n`` > 0, lease their next
    comparisons, in one statement (the labeling hot path).

    ``choice`` is left/right/tie/both_bad as shown; the judgment stores the canonical outcome
    and the displayed order. A repeated ``idempotency_key`` returns the first judgment and
    writes nothing. Refusals (not your lease, already judged, a disabled option, unknown aspects,
    a wrong ranking) raise a ServiceError and leave the database unchanged."""
    if not 0 <= time_spent_ms <= 86_400_000:
        raise Invalid("time_spent_ms must be between 0 and 86400000")
    if len(rationale) > 10_000:
        raise Invalid("rationale is longer than 10000 characters")
    if not 0 <= next_n <= 20:
        raise Invalid("next must be between 0 and 20")
    if aspects is not None and not isinstance(aspects, dict):
        raise Invalid("aspects must be an object {aspect key: choice}")
    checked = _check_artifacts(artifacts or [])
    rows = _labeling_call(
        "SELECT created, judgment_id, body::text FROM"
        " rl_submit(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            slug,
            annotator.id,
            _is_staff(annotator),
            assignment_id,
            choice,
            None if ranking is None else json.dumps([int(x) for x in ranking]),
            json.dumps(aspects or {}),
            rationale,
            json.dumps(checked),
            time_spent_ms,
            idempotency_key,
            source,
            now or timezone.now(),
            next_n,
        ],
    )
    created, judgment_id, body = rows[0]
    if judgment_id is None:
        # The lease was past expires_at: rl_submit expired it (that is kept) and stored nothing.
        error = _json(body)["error"]
        raise Conflict(error["message"], code=error["code"])
    return Submitted(bool(created), int(judgment_id), str(body))


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
    now: datetime | None = None,
) -> SubmitResult:
    """``labeling_submit`` for Python callers: the stored judgment as a row."""
    done = labeling_submit(
        slug=project.slug,
        annotator=annotator,
        assignment_id=assignment_id,
        choice=choice,
        ranking=ranking,
        aspects=aspects,
        rationale=rationale,
        artifacts=artifacts,
        time_spent_ms=time_spent_ms,
        idempotency_key=idempotency_key,
        source=source,
        now=now,
    )
    return SubmitResult(Judgment.objects.get(id=done.judgment_id), done.created)


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
    name = clean_text(name, field="name", max_length=200, strip=True)
    expected = exports.count_judgments(project=project, spec=spec)
    snap = DatasetSnapshot.objects.create(
        project=project, name=name, spec=spec.as_dict(), rows_expected=expected, created_by=actor
    )
    if build_now:
        snapshot_build(snapshot_id=snap.id)
        snap.refresh_from_db()
    elif dispatch:
        task_dispatch(
            tasks.build_snapshot, snap.id, undo=lambda: DatasetSnapshot.objects.filter(id=snap.id).delete()
        )
    return snap


def task_dispatch(task: Any, *args: Any, undo: Callable[[], Any] | None) -> None:
    """Queue ``task(*args)`` once the current transaction commits. When the broker cannot be
    reached, ``undo()`` removes what the request recorded (so no row waits for ever for a task
    that was never queued) and the request fails with a 503 the client can retry."""
    import kombu.exceptions
    import redis.exceptions

    def send() -> None:
        try:
            task.delay(*args)
        except (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError) as exc:
            if undo is None:  # what was recorded stands; a periodic task will queue the work
                log.warning("broker unreachable, %s(%s) not queued: %r", task.name, args, exc)
                return
            undo()
            raise Unavailable(
                "the task broker is unreachable; nothing was queued, retry in a few seconds"
            ) from exc

    transaction.on_commit(send)


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


# --- Priorities (written by the reward models' active learning) --------------------------------
def comparison_priorities_set(*, project_id: int, priorities: Sequence[tuple[int, float]]) -> int:
    """Set the priority of open comparisons of a project (``next`` serves the highest first), as
    (comparison id, priority) pairs; comparisons no longer open, or of another project, are left
    alone, and so are those whose priority is fixed. Returns how many rows changed. This is how
    other apps (rewards' active learning) reorder the queue: they never write annotate's tables
    themselves."""
    if not priorities:
        return 0
    ids = [int(c) for c, _ in priorities]
    values = [round(float(p), 6) for _, p in priorities]
    with connection.cursor() as cur:
        cur.execute(
            """
            UPDATE annotate_comparison c SET priority = v.p
            FROM unnest(%s::bigint[], %s::float8[]) AS v(id, p)
            WHERE c.id = v.id AND c.project_id = %s AND c.status = 'open' AND NOT c.priority_fixed
            """,
            [ids, values, project_id],
        )
        return cur.rowcount


def comparison_priorities_release(
    *, project_id: int, comparison_ids: Sequence[int], priority: float = 0.0
) -> int:
    """Hand fixed-priority comparisons back to active learning: their priority becomes ``priority``
    (until the next reordering sets theirs) and no longer fixed. Returns how many changed."""
    return Comparison.objects.filter(
        project_id=project_id, id__in=[int(c) for c in comparison_ids], priority_fixed=True
    ).update(priority_fixed=False, priority=float(priority))
