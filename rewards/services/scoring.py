"""Scoring samples under a version, incremental refresh, and active-learning priorities (written through ``annotate.services``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone

from annotate.models import Comparison
from annotate.selectors import comparisons_open_pairs
from annotate.services import comparison_priorities_set
from rewards import tasks
from rewards.models import (
    RewardModelVersion,
)
from rewards.services.embeddings import embeddings_ensure, features_load, version_embedding_input
from rewards.services.registry import version_model_load

log = logging.getLogger(__name__)


def version_score_samples(
    *,
    version_id: int,
    only_new: bool = False,
    batch: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Score the samples of the version's project (embedding the new ones first) and store the
    scores; then refresh the priorities of open comparisons when the version is active.

    ``only_new`` scores just the samples this version has no score for and re-prioritises just the
    comparisons created since its last scoring (the periodic refresh); otherwise everything."""
    started = timezone.now()
    version = RewardModelVersion.objects.select_related("project", "encoder", "job").get(id=version_id)
    model = version_model_load(version)
    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT s.id FROM annotate_sample s
            WHERE s.project_id = %s AND (NOT %s OR NOT EXISTS (
                SELECT 1 FROM rewards_samplescore sc WHERE sc.version_id = %s AND sc.sample_id = s.id))
            ORDER BY s.id
            """,
            [version.project_id, only_new, version.id],
        )
        ids = [r[0] for r in cur.fetchall()]
    form = version_embedding_input(version)
    embeddings_ensure(encoder=version.encoder, sample_ids=ids, frames=version.job.video_frames, input=form)
    written = 0
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        x, mask, prompt = features_load(encoder=version.encoder, sample_ids=chunk, input=form)
        out = model.score(x, mask, prompt)
        aspects = [
            json.dumps({k: float(v[i]) for k, v in (out.aspects or {}).items()}) for i in range(len(chunk))
        ]
        with connection.cursor() as cur:
            cur.execute(
                """
                INSERT INTO rewards_samplescore (sample_id, version_id, reward, uncertainty, artifact_prob, aspects, created_at)
                SELECT s, %s, r, u, p, a::jsonb, now()
                FROM unnest(%s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::text[]) AS t(s, r, u, p, a)
                ON CONFLICT (version_id, sample_id) DO UPDATE
                SET reward = EXCLUDED.reward, uncertainty = EXCLUDED.uncertainty,
                    artifact_prob = EXCLUDED.artifact_prob, aspects = EXCLUDED.aspects
                """,
                [
                    version.id,
                    chunk,
                    [float(v) for v in out.reward],
                    _floats_or_none(out.uncertainty, len(chunk)),
                    _floats_or_none(out.artifact_prob, len(chunk)),
                    aspects,
                ],
            )
        written += len(chunk)
        if progress:
            progress(written, len(ids))
    version.refresh_from_db(fields=["is_active", "scored_at"])
    if version.is_active:
        since = version.scored_at if only_new else None
        comparison_priorities_update(version=version, model=model, created_after=since, embedded=not only_new)
    RewardModelVersion.objects.filter(id=version.id).update(scored_at=started)
    return written


def scores_refresh() -> list[int]:
    """Queue incremental scoring for every active version whose project has samples it has not
    scored or comparisons created since it last scored, so new work is prioritised within a
    minute (beat). One queued refresh per version at a time. Returns the version ids queued."""

    queued: list[int] = []
    for version in RewardModelVersion.objects.filter(is_active=True):
        since = version.scored_at
        stale = (
            since is None
            or Comparison.objects.filter(
                project_id=version.project_id, status="open", created_at__gt=since
            ).exists()
        )
        if not stale:
            with connection.cursor() as cur:
                cur.execute(
                    """SELECT EXISTS (SELECT 1 FROM annotate_sample s WHERE s.project_id = %s AND NOT EXISTS (
                         SELECT 1 FROM rewards_samplescore sc WHERE sc.version_id = %s AND sc.sample_id = s.id))""",
                    [version.project_id, version.id],
                )
                row = cur.fetchone()
                stale = bool(row and row[0])
        if stale and cache.add(score_refresh_key(version), True, timeout=600):
            version_id = version.id
            transaction.on_commit(lambda v=version_id: tasks.gpu_score_samples.delay(v, only_new=True))  # type: ignore[misc]
            queued.append(version.id)
    return queued


def version_score_refresh(*, version_id: int) -> int:
    """The periodic refresh queued by ``scores_refresh``: score what is new under the version, then
    let the next refresh be queued again (its key is cleared even when scoring fails)."""
    try:
        return version_score_samples(version_id=version_id, only_new=True)
    finally:
        version = RewardModelVersion.objects.filter(id=version_id).first()
        if version is not None:
            cache.delete(score_refresh_key(version))


def score_refresh_key(version: RewardModelVersion) -> str:
    # The creation time makes the key unique across databases that reuse ids (test runs).
    return f"reward-version:{version.id}:{version.created_at.timestamp()}:refresh-queued"


def _floats_or_none(values: np.ndarray | None, n: int) -> list[float | None]:
    return [None] * n if values is None else [float(v) for v in values]


def comparison_priorities_update(
    *, version: RewardModelVersion, model: Any = None, created_after: Any = None, embedded: bool = False
) -> int:
    """Active learning: set the priority of each open, non-gold pairwise comparison from how unsure
    the model is about it: closeness of P(first wins) to 0.5 (1 at 0.5, 0 at certainty), plus the
    ensemble's disagreement (std of member probabilities) when the model has one. ``next`` serves
    the highest priority first."""
    from rewards.ml.data import PairSet

    model = model or version_model_load(version)
    rows = comparisons_open_pairs(project_id=version.project_id, created_after=created_after)
    if not rows:
        return 0
    sample_ids = sorted({r[1] for r in rows} | {r[2] for r in rows})
    form = version_embedding_input(version)
    if not embedded:  # the caller may have just embedded every sample of the project
        embeddings_ensure(
            encoder=version.encoder, sample_ids=sample_ids, frames=version.job.video_frames, input=form
        )
    x, mask, prompt = features_load(encoder=version.encoder, sample_ids=sample_ids, input=form)
    pos = {sid: i for i, sid in enumerate(sample_ids)}
    n = len(rows)
    pairs = PairSet(
        x=x,
        mask=mask,
        prompt=prompt,
        a=np.array([pos[r[1]] for r in rows], dtype=np.int64),
        b=np.array([pos[r[2]] for r in rows], dtype=np.int64),
        outcome=np.ones(n, dtype=np.int8),
        weight=np.ones(n, dtype=np.float32),
    )
    p = np.asarray(model.prob_first_wins(pairs), dtype=np.float64)
    priority = 1.0 - 2.0 * np.abs(p - 0.5)
    uncertainty = model.pair_uncertainty(pairs)  # None except for ensembles
    if uncertainty is not None:
        priority = priority + 2.0 * np.asarray(uncertainty, dtype=np.float64)
    return comparison_priorities_set(
        project_id=version.project_id,
        priorities=list(zip((r[0] for r in rows), priority.tolist(), strict=True)),
    )
