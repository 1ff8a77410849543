"""Reward-model services: encoders and the embedding cache, training jobs, the registry,
champion/challenger promotion, scoring and active-learning priorities.

The torch code lives in ``rewards.ml`` (no Django there); these functions move data between
PostgreSQL and it. Every launch is validated here, so a bad encoder path, too few pairs or an
out-of-range hyperparameter is a clear 400 when the job is created, not a crashed worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Max
from django.db.models.functions import Coalesce
from django.utils import timezone

from annotate.errors import Conflict, Forbidden, Invalid, NotFound
from annotate.models import Comparison, DatasetSnapshot, Judgment, Project, ProjectMember, Sample
from annotate.services import member_role_require, snapshot_build, snapshot_create, task_dispatch
from rewards.models import (
    Encoder,
    PromptEmbedding,
    RewardConfig,
    RewardModelVersion,
    RewardTrainingJob,
    SampleEmbedding,
)

log = logging.getLogger(__name__)


# Fewer judged pairs than this cannot give a meaningful model; the launch check and the worker
# both ask for this many training pairs after the hold-out, and for at least _min_holdout_pairs()
# held-out ones, without which a version has no figure to be judged on.
def _min_pairs() -> int:
    return int(getattr(settings, "RL_REWARD_MIN_PAIRS", 10))


def _min_holdout_pairs() -> int:
    return int(getattr(settings, "RL_REWARD_MIN_HOLDOUT_PAIRS", 1))


EMBED_BATCH = 32
REWARD_KINDS = ("bt", "aspects", "ensemble", "finetune")  # kinds that can be a project's active reward model
ProgressFn = Callable[[dict[str, Any]], None]


# --- Config -----------------------------------------------------------------------------------------
def reward_config_get(*, project: Project) -> RewardConfig:
    """The project's reward settings (created with defaults on first use)."""
    config, _ = RewardConfig.objects.get_or_create(project=project)
    return config


def _reward_config_read(project: Project) -> RewardConfig:
    """The project's reward settings without writing anything: an unsaved default when it has none
    (a launch that is refused must leave no row behind)."""
    return RewardConfig.objects.filter(project=project).first() or RewardConfig(project=project)


def _project_modalities(project: Project) -> list[str]:
    """The modalities a project's samples have: its own, or for a mixed project (blank modality)
    those its samples actually use."""
    if project.modality:
        return [project.modality]
    return sorted(set(Sample.objects.filter(project=project).values_list("modality", flat=True)))


BUILTIN = "builtin"


def _default_media_encoder() -> str:
    """``RL_DEFAULT_MEDIA_ENCODER``: the encoder of projects with images or videos whose reward
    config names none. ``builtin`` (the default) is the small image-text CLIP built under
    ``var/encoders`` on first use, which also embeds text samples, so a mixed project (the demo)
    trains out of the box; a path names a local CLIP/SigLIP directory; blank means none (a launch
    without an encoder is refused)."""
    import os

    value = getattr(settings, "RL_DEFAULT_MEDIA_ENCODER", None)
    return str(os.environ.get("RL_DEFAULT_MEDIA_ENCODER", BUILTIN) if value is None else value).strip()


def builtin_encoder_path() -> str:
    """The built-in image-text encoder's directory (built on first use, nothing downloaded)."""
    from rewards.ml.builtin_encoder import ensure_builtin_encoder

    return str(ensure_builtin_encoder(Path(settings.VAR_DIR) / "encoders"))


def _default_encoder_path(project: Project) -> str:
    modalities = _project_modalities(project)
    if modalities == ["text"]:
        from rewards.ml.encoders import default_text_encoder_path

        return str(default_text_encoder_path())
    default = _default_media_encoder()
    if default == BUILTIN:
        return builtin_encoder_path()
    if default:
        return default
    raise Invalid(
        f"project {project.slug!r} has no encoder configured: set a local CLIP or SigLIP directory "
        "in its reward config (admin) or pass one with the job (RL_DEFAULT_MEDIA_ENCODER is blank)"
    )


# --- Encoders and the embedding cache --------------------------------------------------------------
def encoder_register(*, path: str) -> Encoder:
    """Validate a local encoder directory (config only, no weights loaded) and record it by the
    fingerprint of its weights."""
    return _encoder_record(_encoder_inspect(path))


def _encoder_inspect(path: str) -> Any:
    """``inspect_encoder`` with its error as a 400; reads files only, writes no row."""
    from rewards.ml.encoders import EncoderError, inspect_encoder

    try:
        return inspect_encoder(path)
    except EncoderError as exc:
        raise Invalid(str(exc), code="bad_encoder") from exc
    except (OSError, ValueError) as exc:  # a name too long for the filesystem, a NUL byte...
        raise Invalid(
            f"encoder directory {path[:200]!r} cannot be read ({type(exc).__name__})", code="bad_encoder"
        ) from exc


def _encoder_known(path: str) -> bool:
    """A directory registered before (by staff, or as a project's configured encoder)."""
    try:
        resolved = str(Path(path).expanduser().resolve())
    except (OSError, ValueError):
        return False
    return (
        Encoder.objects.filter(path__in={path, resolved}).exists()
        or RewardConfig.objects.filter(encoder_path=path).exists()
    )


def _encoder_record(info: Any) -> Encoder:
    encoder, created = Encoder.objects.get_or_create(
        fingerprint=info.fingerprint,
        defaults={
            "name": info.name,
            "path": info.path,
            "family": info.family,
            "model_type": info.model_type,
            "dim": info.dim,
            "modalities": list(info.modalities),
        },
    )
    if not created and encoder.path != info.path:
        Encoder.objects.filter(id=encoder.id).update(path=info.path)
        encoder.path = info.path
    return encoder


def _encoder_supports(encoder: Encoder | Any, modality: str) -> bool:
    """Whether ``encoder`` (a row or an ``EncoderInfo``) embeds samples of ``modality``."""
    modalities = list(encoder.modalities or ())
    if not modalities:  # a row written before encoders recorded what they embed
        modalities = ["text"] if encoder.family == "text" else ["image", "video"]
    return modality in modalities


_LOADED: dict[tuple[str, str], Any] = {}


def _load_encoder(encoder: Encoder, device: str) -> Any:
    """Load once per process: a worker embedding several batches keeps the weights in memory."""
    from rewards.ml.encoders import EncoderError, load_encoder

    key = (encoder.fingerprint, device)
    if key not in _LOADED:
        try:
            loaded = load_encoder(encoder.path, device=device)
        except EncoderError as exc:
            raise Invalid(str(exc), code="bad_encoder") from exc
        if loaded.info.fingerprint != encoder.fingerprint:
            raise Invalid(f"the encoder at {encoder.path} changed since it was registered; register it again")
        _LOADED.clear()  # one encoder in memory at a time
        _LOADED[key] = loaded
    return _LOADED[key]


def _open_image(sample: Sample) -> Any:
    from PIL import Image

    with sample.media.open("rb") as fh:
        image = Image.open(io.BytesIO(fh.read()))
        image.load()
    return image.convert("RGB")


def embeddings_ensure(
    *,
    encoder: Encoder,
    sample_ids: Iterable[int],
    frames: int = 8,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed every listed sample and its prompt that has no vector under ``encoder`` yet, in batches.

    Returns how many samples were embedded now (0 when all were cached). Rows are inserted with
    ``ON CONFLICT DO NOTHING``, so two jobs embedding the same samples at once both succeed."""
    wanted = sorted(set(sample_ids))
    # One array parameter rather than an IN list: a job can touch hundreds of thousands of samples.
    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT s.id, s.prompt_id, e.id IS NOT NULL, pe.id IS NOT NULL
            FROM annotate_sample s
            LEFT JOIN rewards_sampleembedding e ON e.sample_id = s.id AND e.encoder_id = %s
            LEFT JOIN rewards_promptembedding pe ON pe.prompt_id = s.prompt_id AND pe.encoder_id = %s
            WHERE s.id = ANY(%s)
            """,
            [encoder.id, encoder.id, wanted],
        )
        rows = cur.fetchall()
    todo = sorted(sid for sid, _, has, _ in rows if not has)
    prompts_todo_set = {pid for _, pid, _, has_prompt in rows if not has_prompt}
    prompts_todo = sorted(prompts_todo_set)
    total = len(todo) + len(prompts_todo)
    if total == 0:
        return 0
    model = _load_encoder(encoder, device)
    done = 0
    for start in range(0, len(todo), EMBED_BATCH):
        batch = list(Sample.objects.filter(id__in=todo[start : start + EMBED_BATCH]).order_by("id"))
        new_rows: list[SampleEmbedding] = []
        for modality in ("image", "video", "text"):
            group = [s for s in batch if s.modality == modality]
            if not group:
                continue
            if not _encoder_supports(encoder, modality):
                raise Invalid(f"encoder {encoder.name} ({encoder.family}) cannot embed {modality} samples")
            if modality == "image":
                vecs = model.embed_images([_open_image(s) for s in group])
                new_rows += [_embedding_row(encoder, s, vecs[i : i + 1]) for i, s in enumerate(group)]
            elif modality == "text":
                vecs = model.embed_texts([s.text for s in group])
                new_rows += [_embedding_row(encoder, s, vecs[i : i + 1]) for i, s in enumerate(group)]
            else:
                video, mask = model.embed_videos([s.media.path for s in group], frames=frames)
                new_rows += [_embedding_row(encoder, s, video[i][mask[i]]) for i, s in enumerate(group)]
        SampleEmbedding.objects.bulk_create(new_rows, ignore_conflicts=True)
        done += len(batch)
        if progress:
            progress(done, total)
    from annotate.models import Prompt

    for start in range(0, len(prompts_todo), EMBED_BATCH * 2):
        prompts = list(
            Prompt.objects.filter(id__in=prompts_todo[start : start + EMBED_BATCH * 2]).order_by("id")
        )
        vecs = model.embed_texts([p.text for p in prompts])
        PromptEmbedding.objects.bulk_create(
            [
                PromptEmbedding(prompt=p, encoder=encoder, vector=vecs[i].astype(np.float16).tobytes())
                for i, p in enumerate(prompts)
            ],
            ignore_conflicts=True,
        )
        done += len(prompts)
        if progress:
            progress(done, total)
    return len(todo)


def _embedding_row(encoder: Encoder, sample: Sample, vectors: np.ndarray) -> SampleEmbedding:
    return SampleEmbedding(
        sample=sample,
        encoder=encoder,
        count=int(vectors.shape[0]),
        vectors=np.ascontiguousarray(vectors, dtype=np.float16).tobytes(),
    )


def features_load(
    *, encoder: Encoder, sample_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached features of ``sample_ids`` in that order: ``x (S, K, D)``, ``mask (S, K)`` and the
    prompt vectors ``(S, D)``. Every sample must be embedded already.

    Rows come back in PostgreSQL's binary format (bytea as raw bytes, not hex) and are decoded
    with one ``frombuffer`` per batch: loading 200k cached vectors is a second, not a minute."""
    ids = np.asarray(list(sample_ids), dtype=np.int64)
    dim = encoder.dim
    pos = {int(sid): i for i, sid in enumerate(ids)}
    connection.ensure_connection()
    with connection.connection.cursor(binary=True) as cur:
        cur.execute(
            """
            SELECT e.sample_id, e.count, e.vectors, s.prompt_id
            FROM rewards_sampleembedding e JOIN annotate_sample s ON s.id = e.sample_id
            WHERE e.encoder_id = %s AND e.sample_id = ANY(%s::bigint[])
            """,
            [encoder.id, ids.tolist()],
        )
        rows = cur.fetchall()
        prompt_ids = sorted({int(r[3]) for r in rows})
        cur.execute(
            "SELECT prompt_id, vector FROM rewards_promptembedding WHERE encoder_id = %s AND prompt_id = ANY(%s::bigint[])",
            [encoder.id, prompt_ids],
        )
        prompt_rows = cur.fetchall()
    found = {int(r[0]) for r in rows}
    prompt_at = {int(r[0]): i for i, r in enumerate(prompt_rows)}
    missing = [int(sid) for sid in ids if int(sid) not in found]
    missing += [int(r[0]) for r in rows if int(r[3]) not in prompt_at]
    if missing:
        raise Invalid(
            f"{len(missing)} sample(s) have no cached embedding (or prompt embedding) under {encoder.name}, "
            f"e.g. {missing[:5]}"
        )
    k = max((int(r[1]) for r in rows), default=1)
    x = np.zeros((len(ids), k, dim), dtype=np.float32)
    mask = np.zeros((len(ids), k), dtype=bool)
    order = np.fromiter((pos[int(r[0])] for r in rows), dtype=np.int64, count=len(rows))
    counts = np.fromiter((int(r[1]) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype=np.float16).reshape(-1, dim)
    if len(rows) and (counts == 1).all():
        x[order, 0] = flat
        mask[order, 0] = True
    else:
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i, (at, n) in enumerate(zip(order, counts, strict=True)):
            x[at, :n] = flat[offsets[i] : offsets[i] + n]
            mask[at, :n] = True
    pvec = np.frombuffer(b"".join(bytes(r[1]) for r in prompt_rows), dtype=np.float16).reshape(-1, dim)
    prompt = np.zeros((len(ids), dim), dtype=np.float32)
    prompt[order] = pvec[np.fromiter((prompt_at[int(r[3])] for r in rows), dtype=np.int64, count=len(rows))]
    return x, mask, prompt


# --- Training data from a snapshot ----------------------------------------------------------------
_OUTCOME = {"a": 1, "b": -1, "tie": 0, "both_bad": 2}


@dataclass
class JudgedPairs:
    """Pairs read from a raw snapshot, as sample ids (features are attached later)."""

    sample_ids: list[int]  # index -> sample id
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    comparison: np.ndarray
    aspects: dict[str, np.ndarray]
    artifact: np.ndarray  # per sample: 1 flagged, 0 judged clean
    gold_a: np.ndarray  # one pair per gold comparison
    gold_b: np.ndarray
    gold_outcome: np.ndarray
    gold_comparison: np.ndarray
    gold_comparisons: set[int]


def _snapshot_rows(snapshot: DatasetSnapshot) -> Iterable[dict[str, Any]]:
    spec = snapshot.spec
    with snapshot.file.open("rb") as fh:
        if spec.get("format") == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(
                fh,
                columns=[
                    "comparison_id",
                    "sample_ids",
                    "outcome",
                    "ranking",
                    "aspects",
                    "artifacts",
                    "is_gold",
                    "gold_answer",
                ],
            )
            yield from table.to_pylist()
        else:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def _json_field(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value else value


def snapshot_pairs(*, snapshot: DatasetSnapshot) -> JudgedPairs:
    """Every judged pair in a raw snapshot. Rankings give all their ordered pairs; aspects and
    artifact flags come along; gold comparisons also give one pair from their gold answer."""
    index: dict[int, int] = {}

    def ix(sid: int) -> int:
        return index.setdefault(int(sid), len(index))

    a: list[int] = []
    b: list[int] = []
    outcome: list[int] = []
    comparison: list[int] = []
    aspect_rows: list[dict[str, Any]] = []
    flagged: dict[int, int] = {}
    gold: dict[int, tuple[int, int, int]] = {}
    for row in _snapshot_rows(snapshot):
        ids = [int(s) for s in row["sample_ids"]]
        cid = int(row["comparison_id"])
        flags = {
            int(f["sample"])
            for f in (_json_field(row.get("artifacts")) or [])
            if isinstance(f, dict) and f.get("sample") is not None
        }
        for sid in ids:
            i = ix(sid)
            flagged[i] = max(flagged.get(i, 0), 1 if sid in flags else 0)
        if row.get("is_gold"):
            answer = _json_field(row.get("gold_answer")) or {}
            if answer.get("outcome") in _OUTCOME and len(ids) == 2:
                gold[cid] = (ix(ids[0]), ix(ids[1]), _OUTCOME[answer["outcome"]])
        if row["outcome"] == "ranking":
            ranking = [int(s) for s in (row.get("ranking") or [])]
            for i in range(len(ranking)):
                for j in range(i + 1, len(ranking)):
                    a.append(ix(ranking[i]))
                    b.append(ix(ranking[j]))
                    outcome.append(1)
                    comparison.append(cid)
                    aspect_rows.append({})
            continue
        if len(ids) != 2 or row["outcome"] not in _OUTCOME:
            continue
        a.append(ix(ids[0]))
        b.append(ix(ids[1]))
        outcome.append(_OUTCOME[row["outcome"]])
        comparison.append(cid)
        aspect_rows.append(_json_field(row.get("aspects")) or {})
    keys = sorted({k for r in aspect_rows for k in r})
    aspects = {
        k: np.array([_OUTCOME.get(str(r.get(k)), 127) for r in aspect_rows], dtype=np.int8) for k in keys
    }
    sample_ids = [0] * len(index)
    for sid, i in index.items():
        sample_ids[i] = sid
    g = list(gold.items())
    return JudgedPairs(
        sample_ids=sample_ids,
        a=np.array(a, dtype=np.int64),
        b=np.array(b, dtype=np.int64),
        outcome=np.array(outcome, dtype=np.int8),
        comparison=np.array(comparison, dtype=np.int64),
        aspects=aspects,
        artifact=np.array([flagged.get(i, -1) for i in range(len(sample_ids))], dtype=np.int8),
        gold_a=np.array([v[0] for _, v in g], dtype=np.int64),
        gold_b=np.array([v[1] for _, v in g], dtype=np.int64),
        gold_outcome=np.array([v[2] for _, v in g], dtype=np.int8),
        gold_comparison=np.array([c for c, _ in g], dtype=np.int64),
        gold_comparisons=set(gold),
    )


def _unit_hash(salt_id: int, ids: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per id: the held-out split must be the same for every
    version of a project, so that champion and challenger are compared on pairs neither trained on."""
    out = np.empty(len(ids), dtype=np.float64)
    salt = str(salt_id).encode()
    for i, value in enumerate(ids):
        digest = hashlib.blake2b(salt + b":" + str(int(value)).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2**64
    return out


def _split_indices(
    project_id: int, comparison: np.ndarray, gold_comparisons: set[int], holdout: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out pairs, given each pair's comparison id: the one rule
    that both the launch check (``reward_job_create``) and the worker (``pairs_split``) apply."""
    comparison = np.asarray(comparison, dtype=np.int64)
    cids = np.unique(comparison)
    held = cids[_unit_hash(project_id, cids) < holdout]
    is_gold = np.isin(comparison, np.array(sorted(gold_comparisons), dtype=np.int64))
    is_held = np.isin(comparison, held)
    return np.flatnonzero(~is_gold & ~is_held), np.flatnonzero(~is_gold & is_held)


def _split_check(*, kind: str, total: int, train: int, held: int, holdout: float) -> None:
    """Refuse a job whose pairs are too few once split (at launch and again in the worker)."""
    if total < _min_pairs():
        raise Invalid(
            f"too few judged pairs to train on: {total} (at least {_min_pairs()} needed)",
            code="too_few_pairs",
            details={"pairs": total, "min_pairs": _min_pairs()},
        )
    if kind == "artifact":  # trained on per-sample flags, not on the pairs
        return
    if train < _min_pairs() or held < _min_holdout_pairs():
        raise Invalid(
            f"too few judged pairs to train on: holding out {holdout:.0%} of the comparisons leaves "
            f"{train} training and {held} held-out pairs of {total}; at least {_min_pairs()} training "
            f"and {_min_holdout_pairs()} held-out pairs are needed (judge more comparisons)",
            code="too_few_pairs",
            details={
                "pairs": total,
                "train_pairs": train,
                "holdout_pairs": held,
                "min_train_pairs": _min_pairs(),
                "min_holdout_pairs": _min_holdout_pairs(),
            },
        )


@dataclass
class Split:
    train: Any  # PairSet
    holdout: Any  # PairSet
    gold: Any  # PairSet
    sample_ids: list[int]


def pairs_split(
    *,
    project: Project,
    pairs: JudgedPairs,
    x: np.ndarray,
    mask: np.ndarray,
    prompt: np.ndarray,
    holdout: float,
) -> Split:
    """Train/held-out/gold PairSets. Held out by comparison (every vote on a comparison goes to the
    same side) with a per-project stable hash; gold comparisons never train, they are scored apart."""
    from rewards.ml.data import PairSet

    train_idx, held_idx = _split_indices(project.id, pairs.comparison, pairs.gold_comparisons, holdout)
    # Artifact labels split by sample, with the same stable hash.
    sample_held = _unit_hash(project.id, np.array(pairs.sample_ids, dtype=np.int64)) < holdout
    art_train = np.where(sample_held, -1, pairs.artifact).astype(np.int8)
    art_held = np.where(sample_held, pairs.artifact, -1).astype(np.int8)
    n = pairs.a.shape[0]
    full = PairSet(
        x=x,
        mask=mask,
        prompt=prompt,
        a=pairs.a,
        b=pairs.b,
        outcome=pairs.outcome,
        weight=np.ones(n, dtype=np.float32),
        aspects=pairs.aspects,
        artifact=pairs.artifact,
        comparison=pairs.comparison,
    )
    train = full.subset(train_idx)
    train.artifact = art_train
    held_set = full.subset(held_idx)
    held_set.artifact = art_held
    gold = PairSet(
        x=x,
        mask=mask,
        prompt=prompt,
        a=pairs.gold_a,
        b=pairs.gold_b,
        outcome=pairs.gold_outcome,
        weight=np.ones(pairs.gold_a.shape[0], dtype=np.float32),
        comparison=pairs.gold_comparison,
    )
    return Split(train=train, holdout=held_set, gold=gold, sample_ids=pairs.sample_ids)


# --- Jobs ------------------------------------------------------------------------------------------
def reward_hyperparameters_resolve(kind: str, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """The kind's full config with ``overrides`` applied and validated (a 400 naming the field)."""
    from rewards.ml.finetune.config import FinetuneConfig
    from rewards.ml.kinds import CONFIGS as HEAD_CONFIGS
    from rewards.ml.progress import ConfigError

    configs: dict[str, Any] = {**HEAD_CONFIGS, "finetune": FinetuneConfig}
    if kind not in configs:
        raise Invalid(f"unknown reward model kind {kind!r}; choose one of {', '.join(sorted(configs))}")
    if not isinstance(overrides, dict):
        raise Invalid("hyperparameters must be a JSON object")
    values = dict(overrides)
    values.setdefault("device", device)
    try:
        config = configs[kind].from_dict(values)
        config.validate()
    except ConfigError as exc:
        raise Invalid(
            f"hyperparameter {exc.field}: {exc.message}",
            code="bad_hyperparameter",
            details={"field": exc.field},
        ) from exc
    return config.to_dict()


def _raw_spec() -> Any:
    from annotate import exports

    return exports.spec_from_params(
        {"schema": "raw", "format": "parquet", "aggregate": "none", "media": "url"}
    )


def _pairs_expected(project: Project, snapshot: DatasetSnapshot | None) -> tuple[np.ndarray, set[int]]:
    """The comparison id of every pair the job will read, and the gold comparisons that never
    train, as ``snapshot_pairs`` will find them: from the built snapshot itself, or else from the
    judgments that a snapshot with that spec (or the raw one a launch records) will hold."""
    if snapshot is not None and snapshot.status == DatasetSnapshot.Status.DONE and snapshot.file:
        pairs = snapshot_pairs(snapshot=snapshot)
        return pairs.comparison, pairs.gold_comparisons
    from annotate import exports

    spec = exports.spec_from_dict(snapshot.spec) if snapshot is not None else _raw_spec()
    where, params = exports.judgment_where(project, spec)
    # The rules of snapshot_pairs in SQL: a pairwise outcome of a two-sample comparison is one pair,
    # a ranking of n samples n(n-1)/2; a gold comparison with a usable answer never trains.
    with connection.cursor() as cur:
        cur.execute(
            f"""
            SELECT c.id,
                   c.is_gold AND n.n = 2 AND c.gold_answer->>'outcome' IN ('a', 'b', 'tie', 'both_bad'),
                   sum(CASE WHEN j.outcome = 'ranking' AND jsonb_typeof(j.ranking) = 'array'
                            THEN jsonb_array_length(j.ranking) * (jsonb_array_length(j.ranking) - 1) / 2
                            WHEN j.outcome IN ('a', 'b', 'tie', 'both_bad') AND n.n = 2 THEN 1
                            ELSE 0 END)
            FROM annotate_judgment j
            JOIN annotate_comparison c ON c.id = j.comparison_id
            CROSS JOIN LATERAL (
                SELECT count(*) AS n FROM annotate_comparisonsample cs WHERE cs.comparison_id = c.id
            ) n
            WHERE {" AND ".join(where)}
            GROUP BY c.id, n.n
            """,
            params,
        )
        rows = cur.fetchall()
    comparison = np.repeat(
        np.array([r[0] for r in rows], dtype=np.int64), np.array([int(r[2]) for r in rows], dtype=np.int64)
    )
    return comparison, {int(r[0]) for r in rows if r[1]}


def reward_job_create(
    *,
    project: Project,
    actor: Any,
    kind: str | None = None,
    encoder_path: str | None = None,
    snapshot: DatasetSnapshot | None = None,
    hyperparameters: dict[str, Any] | None = None,
    holdout: float | None = None,
    device: str = "cpu",
    promote: bool = True,
    trigger: str = RewardTrainingJob.Trigger.MANUAL,
    dispatch: bool = True,
) -> RewardTrainingJob:
    """Validate and queue a reward-model training job (managers only).

    Everything that can be checked before training is checked here, with a clear message: the
    kind and its hyperparameters, the encoder directory (a real transformers model of a supported
    family, able to embed the project's modality), the held-out share, and that the project (or
    the given snapshot) holds enough judged pairs. Without ``snapshot`` a raw Parquet snapshot of
    every judgment is recorded now and built by the job, so each version names the exact data it
    saw. ``dispatch`` queues the job on the ``gpu`` queue once the transaction commits."""
    # Every check reads only: a refused launch leaves no row behind (not even a RewardConfig or
    # an Encoder), and it refuses exactly what the worker would, with the same split.
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    rc = _reward_config_read(project)
    kind = kind or rc.kind
    holdout = rc.holdout if holdout is None else float(holdout)
    if not 0.05 <= holdout <= 0.5:
        raise Invalid("holdout must be between 0.05 and 0.5 (the share of comparisons held out)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise Invalid(f"device must be 'cpu' or 'cuda[:N]', not {device!r}")
    config = reward_hyperparameters_resolve(
        kind, dict(rc.hyperparameters or {}) | dict(hyperparameters or {}), device
    )
    # Cheap refusals first: the encoder check may build the built-in encoder (torch) on first use.
    if not Judgment.objects.filter(project=project).exists():
        raise Invalid(
            f"project {project.slug!r} has no judgments yet: nothing to train on", code="no_judgments"
        )
    if encoder_path and not getattr(actor, "is_staff", False) and not _encoder_known(encoder_path):
        # A server path is the staff's to choose: a manager who could name any directory would
        # learn which ones exist from the errors. Managers pick among registered encoders.
        raise Forbidden(
            "only staff can register a new encoder directory; use one already registered or ask an admin",
            code="bad_encoder",
        )
    info = _encoder_inspect(encoder_path or rc.encoder_path or _default_encoder_path(project))
    modalities = _project_modalities(project)
    if kind == "finetune" and (modalities != ["image"] or info.family == "text"):
        raise Invalid(
            "encoder fine-tuning is for image projects with a CLIP or SigLIP encoder", code="bad_encoder"
        )
    unsupported = [m for m in modalities if not _encoder_supports(info, m)]
    if unsupported:
        # One head needs one embedding space: the encoder must embed every kind of sample there is.
        raise Invalid(
            f"encoder {info.name} is a {info.family} encoder and cannot embed "
            f"{' or '.join(unsupported)} samples",
            code="bad_encoder",
        )
    if snapshot is not None:
        if snapshot.project_id != project.id:
            raise NotFound(f"no snapshot {snapshot.id} in {project.slug}")
        if snapshot.spec.get("schema") != "raw" or snapshot.spec.get("aggregate", "none") != "none":
            raise Invalid("a reward job trains on a raw snapshot (schema=raw, aggregate=none)")
        if snapshot.status == DatasetSnapshot.Status.FAILED:
            raise Invalid(f"snapshot {snapshot.id} failed to build: {snapshot.error}")
    comparison, gold = _pairs_expected(project, snapshot)
    train_idx, held_idx = _split_indices(project.id, comparison, gold, holdout)
    _split_check(kind=kind, total=len(comparison), train=len(train_idx), held=len(held_idx), holdout=holdout)
    with transaction.atomic():
        encoder = _encoder_record(info)
        own_snapshot = snapshot is None
        if snapshot is None:
            snapshot = snapshot_create(
                project=project, actor=actor, spec=_raw_spec(), name=f"reward-{kind}", dispatch=False
            )
        job = RewardTrainingJob.objects.create(
            project=project,
            kind=kind,
            encoder=encoder,
            encoder_path=encoder.path,
            snapshot=snapshot,
            config=config,
            holdout=holdout,
            video_frames=rc.video_frames,
            device=device,
            promote=promote,
            trigger=trigger,
            created_by=actor,
            progress={"phase": "queued"},
        )
        if dispatch:
            from rewards.tasks import gpu_train_reward_model

            def undo() -> None:  # the broker is down: no job may wait for ever in "queued"
                RewardTrainingJob.objects.filter(id=job.id).delete()
                if own_snapshot:
                    DatasetSnapshot.objects.filter(id=snapshot.id).delete()

            task_dispatch(gpu_train_reward_model, job.id, undo=undo)
    return job


def reward_job_cancel(*, job: RewardTrainingJob, actor: Any) -> RewardTrainingJob:
    """Ask a job to stop. A queued job is cancelled at once; a running one stops at its next
    progress report (within about a second of training)."""
    member_role_require(project=job.project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    with transaction.atomic():
        job = RewardTrainingJob.objects.select_for_update().get(id=job.id)
        if job.status in (
            RewardTrainingJob.Status.SUCCEEDED,
            RewardTrainingJob.Status.FAILED,
            RewardTrainingJob.Status.CANCELLED,
        ):
            raise Conflict(f"job {job.id} already {job.status}")
        job.cancel_requested = True
        fields = ["cancel_requested"]
        if job.status == RewardTrainingJob.Status.QUEUED:
            job.status = RewardTrainingJob.Status.CANCELLED
            job.finished_at = timezone.now()
            fields += ["status", "finished_at"]
        job.save(update_fields=fields)
    cache.set(cancel_key(job), True, timeout=7 * 24 * 3600)
    return job


def cancel_key(job: RewardTrainingJob) -> str:
    # The creation time makes the key unique across databases that reuse ids: test processes running
    # side by side (pytest -n) share one Redis, and a job id alone let one process's cancel stop
    # another's same-numbered job mid-training.
    return f"rewardjob:{job.id}:{job.created_at.timestamp()}:cancel"


class _Reporter:
    """Writes a job's progress at most once a second and checks for cancellation at the same time."""

    def __init__(self, job: RewardTrainingJob, echo: ProgressFn | None):
        self.job_id = job.id
        self.cancel_key = cancel_key(job)
        self.echo = echo
        self.last = 0.0
        self.state: dict[str, Any] = {}

    def __call__(self, force: bool = False, persist: bool = True, **state: Any) -> None:
        from rewards.ml.progress import TrainingCancelled

        self.state = {**self.state, **state}
        if self.echo:
            self.echo(dict(self.state))
        # The cancel flag is mirrored in the cache so every report can afford to look at it.
        if cache.get(self.cancel_key):
            raise TrainingCancelled(f"job {self.job_id} cancelled")
        now = time.monotonic()
        if not persist or (not force and now - self.last < 1.0):
            return
        self.last = now
        updated = RewardTrainingJob.objects.filter(id=self.job_id).update(
            progress=self.state, heartbeat_at=timezone.now()
        )
        if updated and RewardTrainingJob.objects.filter(id=self.job_id, cancel_requested=True).exists():
            raise TrainingCancelled(f"job {self.job_id} cancelled")

    def phase(self, name: str, **state: Any) -> None:
        # Training figures stay visible after training (the final step and loss); the rest resets.
        kept = {
            k: v for k, v in self.state.items() if k in ("step", "total_steps", "epoch", "epochs", "loss")
        }
        self.state = {**kept, "phase": name, **state}
        self(force=True)


def _models_root() -> Path:
    return Path(settings.MEDIA_ROOT) / "reward_models"


def reward_job_run(*, job_id: int, progress: ProgressFn | None = None) -> RewardTrainingJob:
    """Run a queued job to the end: build its snapshot, embed what is missing, train, evaluate,
    register the version and run champion/challenger. Safe to call twice: a finished job is left as
    it is. A failure marks the job failed with the error; cancellation marks it cancelled."""
    from rewards.ml.progress import TrainingCancelled

    with transaction.atomic():
        job = (
            RewardTrainingJob.objects.select_for_update()
            .select_related("project", "encoder", "snapshot")
            .get(id=job_id)
        )
        if job.status not in (RewardTrainingJob.Status.QUEUED, RewardTrainingJob.Status.RUNNING):
            return job
        job.status = RewardTrainingJob.Status.RUNNING
        job.started_at = job.heartbeat_at = timezone.now()
        job.save(update_fields=["status", "started_at", "heartbeat_at"])
        if not job.cancel_requested:
            cache.delete(cancel_key(job))  # a stale flag (e.g. a job restored from a backup)
    report = _Reporter(job, progress)
    try:
        version = _train(job, report)
    except TrainingCancelled:
        RewardTrainingJob.objects.filter(id=job.id).update(
            status=RewardTrainingJob.Status.CANCELLED,
            finished_at=timezone.now(),
            progress={**report.state, "phase": "cancelled"},
        )
    except Exception as exc:
        log.exception("reward job %s failed", job.id)
        message = exc.message if isinstance(exc, Invalid) else f"{type(exc).__name__}: {exc}"
        RewardTrainingJob.objects.filter(id=job.id).update(
            status=RewardTrainingJob.Status.FAILED,
            finished_at=timezone.now(),
            error=message,
            progress={**report.state, "phase": "failed"},
        )
    else:
        RewardTrainingJob.objects.filter(id=job.id).update(
            status=RewardTrainingJob.Status.SUCCEEDED,
            finished_at=timezone.now(),
            progress={**report.state, "phase": "done"},
        )
        if version.is_active:
            from rewards.tasks import gpu_score_samples

            transaction.on_commit(lambda: gpu_score_samples.delay(version.id))
    job.refresh_from_db()
    return job


def _train(job: RewardTrainingJob, report: _Reporter) -> RewardModelVersion:
    from rewards.ml import metrics
    from rewards.ml.kinds import CONFIGS, TRAINERS
    from rewards.ml.progress import Progress

    project = job.project
    report.phase("snapshot")
    snapshot = job.snapshot
    if snapshot.status != DatasetSnapshot.Status.DONE:
        # Called from inside the export's read-only transaction: no database write there.
        snapshot = snapshot_build(
            snapshot_id=snapshot.id, progress=lambda rows: report(persist=False, rows=rows)
        )
        if snapshot.status != DatasetSnapshot.Status.DONE:
            raise Invalid(f"snapshot {snapshot.id} is {snapshot.status}, not built")
    pairs = snapshot_pairs(snapshot=snapshot)
    # The launch made the same check on the same rule; judgments undone since can still fail it.
    train_idx, held_idx = _split_indices(project.id, pairs.comparison, pairs.gold_comparisons, job.holdout)
    _split_check(
        kind=job.kind,
        total=len(pairs.comparison),
        train=len(train_idx),
        held=len(held_idx),
        holdout=job.holdout,
    )

    report.phase("embedding", done=0, total=len(pairs.sample_ids))
    embeddings_ensure(
        encoder=job.encoder,
        sample_ids=pairs.sample_ids,
        frames=job.video_frames,
        device=job.device,
        progress=lambda done, total: report(done=done, total=total),
    )
    x, mask, prompt = features_load(encoder=job.encoder, sample_ids=pairs.sample_ids)
    split = pairs_split(project=project, pairs=pairs, x=x, mask=mask, prompt=prompt, holdout=job.holdout)

    report.phase("training", step=0)

    def on_progress(p: Progress) -> None:
        report(
            False,
            True,
            step=p.step,
            total_steps=p.total_steps,
            epoch=p.epoch,
            epochs=p.epochs,
            loss=round(float(p.loss), 5),
            elapsed_s=round(p.elapsed_s, 1),
            eta_s=round(p.eta_s, 1),
            **{k: v for k, v in (p.metrics or {}).items() if isinstance(v, int | float)},
        )

    encoder = job.encoder
    if job.kind == "finetune":
        model, encoder, split, directory = _finetune(job, pairs, split, on_progress)
    else:
        config = CONFIGS[job.kind].from_dict(job.config)
        model = TRAINERS[job.kind](
            config,
            split.train,
            holdout=split.holdout if split.holdout.num_pairs else None,
            progress=on_progress,
        )

    report.phase("evaluating")
    figures: dict[str, Any] = {
        "train_pairs": int(split.train.num_pairs),
        "holdout_pairs": int(split.holdout.num_pairs),
        "samples": len(split.sample_ids),
        "holdout": metrics.evaluate(model, split.holdout) if split.holdout.num_pairs else None,
        "gold": metrics.evaluate(model, split.gold) if split.gold.num_pairs else None,
        "majority": metrics.majority_agreement(model, split.holdout) if split.holdout.num_pairs else None,
    }
    holdout_figs = figures["holdout"] or {}
    figures["holdout_accuracy"] = holdout_figs.get("accuracy")
    figures["gold_accuracy"] = (figures["gold"] or {}).get("accuracy")
    figures["majority_agreement"] = (figures["majority"] or {}).get("accuracy")
    figures["ece"] = holdout_figs.get("ece")
    figures["aspect_accuracy"] = holdout_figs.get("aspect_accuracy") or {}

    report.phase("saving")
    with transaction.atomic():
        Project.objects.select_for_update().filter(id=project.id).first()
        number = (RewardModelVersion.objects.filter(project=project).aggregate(m=Max("number"))["m"] or 0) + 1
        if job.kind != "finetune":  # a fine-tuned model was saved with its encoder already
            directory = _models_root() / project.slug / f"v{number}-{job.kind}-job{job.id}"
            model.save_pretrained(
                directory,
                extra={
                    "project": project.slug,
                    "version": number,
                    "encoder": {
                        "name": encoder.name,
                        "fingerprint": encoder.fingerprint,
                        "family": encoder.family,
                        "dim": encoder.dim,
                    },
                    "snapshot": {"id": snapshot.id, "sha256": snapshot.sha256},
                    "holdout": job.holdout,
                    "metrics": figures,
                },
            )
        version = RewardModelVersion.objects.create(
            project=project,
            number=number,
            job=job,
            kind=job.kind,
            encoder=encoder,
            snapshot=snapshot,
            path=str(directory),
            metrics=figures,
            curves=list(getattr(model, "curves", []) or []),
        )
    if job.promote:
        report.phase("champion/challenger")
        version = version_decide(version=version, model=model, split=split)
    return version


def _finetune(
    job: RewardTrainingJob, pairs: JudgedPairs, split: Split, on_progress: Callable[[Any], None]
) -> tuple[Any, Encoder, Split, Path]:
    """Fine-tune the image tower (last layers or LoRA) with a BT head on the images themselves, save
    it, register the fine-tuned encoder, and re-split with features from it, so evaluation,
    champion/challenger and scoring run the same code as for every other kind."""
    from rewards.ml.finetune.config import FinetuneConfig
    from rewards.ml.finetune.trainer import ImagePairs
    from rewards.ml.finetune.trainer import train as finetune_train

    config = FinetuneConfig.from_dict(job.config)
    by_id: dict[int, Sample] = {}
    ids = list(split.sample_ids)
    for start in range(0, len(ids), 5000):
        by_id.update(Sample.objects.select_related("prompt").in_bulk(ids[start : start + 5000]))
    images = [_open_image(by_id[sid]) for sid in ids]
    prompts = [by_id[sid].prompt.text for sid in ids]

    def image_pairs(ps: Any) -> ImagePairs:
        return ImagePairs(
            images=images, prompts=prompts, a=ps.a, b=ps.b, outcome=ps.outcome, weight=ps.weight
        )

    result = finetune_train(
        config,
        image_pairs(split.train),
        encoder_path=job.encoder.path,
        holdout=image_pairs(split.holdout) if split.holdout.num_pairs else None,
        progress=on_progress,
    )
    directory = _models_root() / job.project.slug / f"job{job.id}-finetune"
    result.save_pretrained(directory)
    encoder = encoder_register(path=str(directory / "encoder"))
    embeddings_ensure(encoder=encoder, sample_ids=ids, frames=job.video_frames, device=job.device)
    x, mask, prompt = features_load(encoder=encoder, sample_ids=ids)
    return (
        result.head,
        encoder,
        pairs_split(project=job.project, pairs=pairs, x=x, mask=mask, prompt=prompt, holdout=job.holdout),
        directory,
    )


# --- Registry: champion / challenger --------------------------------------------------------------
def _load_version_model(version: RewardModelVersion, device: str = "cpu") -> Any:
    from rewards.ml.model import load_reward_model

    return load_reward_model(version.path, device=device)


def _better(challenger: dict[str, Any], champion: dict[str, Any]) -> bool:
    ca, cb = challenger.get("accuracy"), champion.get("accuracy")
    if ca is None:
        return False
    if cb is None or ca > cb + 1e-12:
        return True
    if abs(ca - cb) <= 1e-12:
        return (challenger.get("log_loss") or float("inf")) < (champion.get("log_loss") or float("inf"))
    return False


def version_decide(
    *, version: RewardModelVersion, model: Any = None, split: Split | None = None
) -> RewardModelVersion:
    """Champion/challenger: ``version`` becomes active only if it beats the active version on the
    same held-out pairs (accuracy, then log loss on a tie). The decision and both sets of figures
    are stored on the version."""
    from rewards.ml import metrics
    from rewards.ml.data import PairSet

    project = version.project
    if version.kind not in REWARD_KINDS:
        decision = {
            "promoted": False,
            "reason": f"a {version.kind} model is not a reward model; it is used beside one",
        }
        RewardModelVersion.objects.filter(id=version.id).update(decision=decision)
        version.decision = decision
        return version
    challenger_figs = (version.metrics or {}).get("holdout") or {}
    with transaction.atomic():
        Project.objects.select_for_update().filter(id=project.id).first()
        champion = (
            RewardModelVersion.objects.filter(project=project, is_active=True).exclude(id=version.id).first()
        )
        if challenger_figs.get("accuracy") is None:
            # Never promote without evidence: no held-out figure says this version is any good.
            decision = {
                "promoted": False,
                "reason": "no held-out figures: it was evaluated on no held-out pairs, so nothing shows "
                "it is any good (a manager can still activate it by hand)",
                "holdout_pairs": int((version.metrics or {}).get("holdout_pairs") or 0),
                "challenger": _brief(challenger_figs, version),
                **({"champion_version": champion.number} if champion is not None else {}),
            }
        elif champion is None:
            decision = {
                "promoted": True,
                "reason": "no active model yet",
                "challenger": _brief(challenger_figs, version),
            }
        elif split is None or split.holdout.num_pairs == 0:
            decision = {
                "promoted": False,
                "reason": "no held-out pairs to compare on",
                "champion_version": champion.number,
            }
        else:
            champ_model = _load_version_model(champion)
            held = split.holdout
            if champion.encoder_id != version.encoder_id:
                embeddings_ensure(
                    encoder=champion.encoder, sample_ids=split.sample_ids, frames=version.job.video_frames
                )
                x, mask, prompt = features_load(encoder=champion.encoder, sample_ids=split.sample_ids)
                held = PairSet(
                    x=x,
                    mask=mask,
                    prompt=prompt,
                    a=held.a,
                    b=held.b,
                    outcome=held.outcome,
                    weight=held.weight,
                    aspects=held.aspects,
                    comparison=held.comparison,
                )
            champion_figs = metrics.evaluate(champ_model, held)
            promoted = _better(challenger_figs, champion_figs)
            decision = {
                "promoted": promoted,
                "reason": "beats the active model on the same held-out pairs"
                if promoted
                else "does not beat the active model on the same held-out pairs",
                "pairs": int(held.num_pairs),
                "challenger": _brief(challenger_figs, version),
                "champion": _brief(champion_figs, champion),
            }
        if decision["promoted"]:
            RewardModelVersion.objects.filter(project=project, is_active=True).update(is_active=False)
            version.is_active = True
        version.decision = decision
        version.save(update_fields=["is_active", "decision"])
    return version


def _brief(figs: dict[str, Any], version: RewardModelVersion) -> dict[str, Any]:
    return {"version": version.number, **{k: figs.get(k) for k in ("accuracy", "log_loss", "ece", "pairs")}}


def version_activate(*, version: RewardModelVersion, actor: Any) -> RewardModelVersion:
    """Make ``version`` the active model by hand (managers only), e.g. to roll back."""
    member_role_require(project=version.project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if version.kind not in REWARD_KINDS:
        raise Invalid(f"a {version.kind} model cannot be the project's reward model")
    with transaction.atomic():
        Project.objects.select_for_update().filter(id=version.project_id).first()
        RewardModelVersion.objects.filter(project_id=version.project_id, is_active=True).update(
            is_active=False
        )
        version.is_active = True
        version.decision = {
            **(version.decision or {}),
            "activated_by": actor.username,
            "activated_at": timezone.now().isoformat(),
        }
        version.save(update_fields=["is_active", "decision"])
        from rewards.tasks import gpu_score_samples

        # With the broker down the activation stands: beat's scores_refresh queues the scoring of
        # the active version's unscored samples once the broker is back.
        task_dispatch(gpu_score_samples, version.id, undo=None)
    return version


# --- Scoring and active learning ------------------------------------------------------------------
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
    model = _load_version_model(version)
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
    embeddings_ensure(encoder=version.encoder, sample_ids=ids, frames=version.job.video_frames)
    written = 0
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        x, mask, prompt = features_load(encoder=version.encoder, sample_ids=chunk)
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
    from rewards.tasks import gpu_score_samples

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
            transaction.on_commit(lambda v=version_id: gpu_score_samples.delay(v, only_new=True))  # type: ignore[misc]
            queued.append(version.id)
    return queued


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

    model = model or _load_version_model(version)
    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT c.id, min(cs.sample_id), max(cs.sample_id)
            FROM annotate_comparison c JOIN annotate_comparisonsample cs ON cs.comparison_id = c.id
            WHERE c.project_id = %s AND c.status = 'open' AND NOT c.is_gold
              AND (%s::timestamptz IS NULL OR c.created_at > %s::timestamptz)
            GROUP BY c.id HAVING count(*) = 2
            """,
            [version.project_id, created_after, created_after],
        )
        rows = cur.fetchall()
    if not rows:
        return 0
    sample_ids = sorted({r[1] for r in rows} | {r[2] for r in rows})
    if not embedded:  # the caller may have just embedded every sample of the project
        embeddings_ensure(encoder=version.encoder, sample_ids=sample_ids, frames=version.job.video_frames)
    x, mask, prompt = features_load(encoder=version.encoder, sample_ids=sample_ids)
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
    with connection.cursor() as cur:
        cur.execute(
            """
            UPDATE annotate_comparison c SET priority = v.p
            FROM unnest(%s::bigint[], %s::float8[]) AS v(id, p)
            WHERE c.id = v.id AND c.status = 'open'
            """,
            [[r[0] for r in rows], [round(float(v), 6) for v in priority]],
        )
        return cur.rowcount


# --- Periodic retraining ---------------------------------------------------------------------------
def jobs_fail_stale(*, now: Any = None) -> int:
    """Mark failed the running jobs whose worker stopped reporting (killed, out of memory, machine
    lost): no progress write for ``RL_REWARD_JOB_STALE_SECONDS``. Without this, one dead job would
    block its project's automatic retraining for ever."""
    now = now or timezone.now()
    stale = int(getattr(settings, "RL_REWARD_JOB_STALE_SECONDS", 600))
    return (
        RewardTrainingJob.objects.filter(status=RewardTrainingJob.Status.RUNNING)
        .annotate(seen=Coalesce("heartbeat_at", "started_at", "created_at"))
        .filter(seen__lt=now - timedelta(seconds=stale))
    ).update(
        status=RewardTrainingJob.Status.FAILED,
        finished_at=now,
        error=f"worker lost: no progress report for {stale} s",
    )


def retrain_due(*, now: Any = None) -> list[int]:
    """Launch a job for every project whose auto-retrain rule is met: at least N judgments since the
    last job was created, or T minutes since it and at least one new judgment. Projects with a job
    queued or running are skipped. Returns the new job ids."""
    now = now or timezone.now()
    jobs_fail_stale(now=now)
    launched: list[int] = []
    for rc in RewardConfig.objects.filter(auto_retrain=True).select_related("project", "project__created_by"):
        project = rc.project
        jobs = RewardTrainingJob.objects.filter(project=project)
        if jobs.filter(
            status__in=[RewardTrainingJob.Status.QUEUED, RewardTrainingJob.Status.RUNNING]
        ).exists():
            continue
        last = jobs.order_by("-created_at").first()
        since = last.created_at if last else None
        judgments = Judgment.objects.filter(project=project)
        new = judgments.filter(created_at__gt=since).count() if since else judgments.count()
        due = new >= rc.retrain_min_new_judgments or bool(
            rc.retrain_every_minutes
            and new > 0
            and since
            and (now - since).total_seconds() >= rc.retrain_every_minutes * 60
        )
        if not due:
            continue
        try:
            job = reward_job_create(
                project=project, actor=project.created_by, trigger=RewardTrainingJob.Trigger.AUTO
            )
        except Invalid as exc:
            log.warning("auto-retrain of %s not launched: %s", project.slug, exc.message)
            continue
        launched.append(job.id)
    return launched
