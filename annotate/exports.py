"""Preference datasets out: rows in the schemas trainers read, streamed in JSONL, CSV or Parquet.

Rows come from a server-side cursor in chunks, so memory stays flat whatever the size: a chunk
of judgments, the samples and prompts it needs, the rows, then the next chunk. Judgments arrive
ordered by comparison, so the votes of one comparison are aggregated without holding more than
that comparison.

Schemas (``SCHEMAS``):
- ``trl``: prompt, chosen, rejected (TRL RewardTrainer / DPOTrainer); comparisons whose outcome
  is a tie or both-bad have no chosen/rejected and are left out.
- ``pickapic``: caption, jpg_0, jpg_1, label_0, label_1 (0.5/0.5 for ties), model_0, model_1,
  user_id, ... as in the Pick-a-Pic dataset; both-bad outcomes are left out. Images only: a project
  with video or text samples is refused unless the export asks for ``modality=image``.
- ``aspects``: one column per aspect outcome, VideoAlign style (A / B / same).
- ``ranking``: full rankings (sample ids best first); pairwise outcomes become 2-rankings.
- ``raw``: every judgment with annotator, displayed order, time spent, aspects, artifacts, rationale.

Aggregation (``aggregate``): ``none`` (a row per judgment), ``majority`` (a row per comparison,
the most voted outcome; an A/B draw counts as a tie) or ``soft`` (a row per comparison, labels
are vote shares, ties count half). Every aggregated row carries ``num_votes`` and ``agreement``
(the share of votes for the majority outcome).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, Any

from django.db import connection, transaction

from annotate.errors import Invalid
from annotate.models import Project, Sample
from annotate.validation import as_id

SCHEMAS = ("trl", "pickapic", "aspects", "ranking", "raw")
FORMATS = ("jsonl", "csv", "parquet")
AGGREGATES = ("none", "majority", "soft")
MEDIA_MODES = ("url", "bytes")
CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
}
CHUNK = 2000


@dataclass(frozen=True)
class ExportSpec:
    """What to export. Validated on construction; every field has a safe default."""

    schema: str = "trl"
    format: str = "jsonl"
    aggregate: str = "majority"
    media: str = "url"  # image/video samples as file URLs, or their bytes embedded
    base_url: str = ""  # prefix for media URLs (the API passes the request's host)
    since: dt.datetime | None = None  # judgments created at or after
    until: dt.datetime | None = None  # judgments created before
    min_agreement: float | None = None  # drop comparisons whose agreement is lower
    exclude_paused: bool = False  # leave out judgments of paused annotators
    gold: str = "any"  # any | only | exclude
    aspect: str | None = None  # trl/pickapic: use this aspect's outcome instead of the overall one
    generator_versions: tuple[int, ...] = field(default_factory=tuple)  # keep comparisons of these only
    modality: str | None = None  # keep comparisons of image, video or text samples only

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise Invalid(f"schema must be one of {', '.join(SCHEMAS)}")
        if self.format not in FORMATS:
            raise Invalid(f"format must be one of {', '.join(FORMATS)}")
        if self.aggregate not in AGGREGATES:
            raise Invalid(f"aggregate must be one of {', '.join(AGGREGATES)}")
        if self.media not in MEDIA_MODES:
            raise Invalid(f"media must be one of {', '.join(MEDIA_MODES)}")
        if self.gold not in ("any", "only", "exclude"):
            raise Invalid("gold must be one of any, only, exclude")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise Invalid("min_agreement must be between 0 and 1")
        if self.modality not in (None, "image", "video", "text"):
            raise Invalid("modality must be image, video or text")
        if self.since and self.until and self.since >= self.until:
            raise Invalid("since must be before until")
        if self.schema == "raw" and self.aggregate != "none":
            object.__setattr__(self, "aggregate", "none")

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "format": self.format,
            "aggregate": self.aggregate,
            "media": self.media,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "min_agreement": self.min_agreement,
            "exclude_paused": self.exclude_paused,
            "gold": self.gold,
            "aspect": self.aspect,
            "generator_versions": list(self.generator_versions),
            "modality": self.modality,
        }


def validate_for_project(*, project: Project, spec: ExportSpec) -> None:
    """Refuse before streaming what would only fail halfway through."""
    keys = [a["key"] for a in project.aspects]
    if spec.aspect is not None and spec.aspect not in keys:
        raise Invalid(f"unknown aspect {spec.aspect!r}; this project has {keys}")
    if spec.schema == "aspects" and not keys:
        raise Invalid("this project has no aspects; use another schema")
    if spec.schema == "pickapic" and spec.modality != "image":
        # Pick-a-Pic's jpg_0/jpg_1 are images: MP4 bytes or markdown there would break its readers.
        others = _modalities(project) - {"image"}
        if others:
            raise Invalid(
                f"schema=pickapic holds images only (jpg_0, jpg_1) and this project has "
                f"{' and '.join(sorted(others))} samples: add modality=image to export only its image "
                "comparisons, or use schema=trl or raw",
                code="pickapic_images_only",
                details={"modalities": sorted(others)},
            )


def _modalities(project: Project) -> set[str]:
    if project.modality:
        return {project.modality}
    return set(Sample.objects.filter(project=project).values_list("modality", flat=True).distinct())


def spec_from_dict(data: dict[str, Any]) -> ExportSpec:
    """Inverse of ``ExportSpec.as_dict`` (snapshots store their spec as JSON)."""
    d = dict(data)
    for key in ("since", "until"):
        if d.get(key):
            d[key] = dt.datetime.fromisoformat(d[key])
    d["generator_versions"] = tuple(d.get("generator_versions") or ())
    return ExportSpec(**d)


def spec_from_params(params: Any, *, base_url: str = "") -> ExportSpec:
    """Parse export parameters (query string or JSON body) into an ExportSpec; 400 on bad values."""
    from annotate.models import GeneratorVersion

    def when(name: str) -> dt.datetime | None:
        raw = params.get(name)
        if not raw:
            return None
        try:
            value = dt.datetime.fromisoformat(str(raw))
        except ValueError as exc:
            raise Invalid(f"{name!r} must be an ISO 8601 date or datetime") from exc
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)

    def flag(name: str) -> bool:
        raw = str(params.get(name, "")).lower()
        if raw in ("", "0", "false", "no"):
            return False
        if raw in ("1", "true", "yes"):
            return True
        raise Invalid(f"{name!r} must be true or false")

    min_agreement = params.get("min_agreement")
    try:
        min_agreement_value = float(min_agreement) if min_agreement not in (None, "") else None
    except (TypeError, ValueError) as exc:
        raise Invalid("'min_agreement' must be a number between 0 and 1") from exc
    versions: list[int] = []
    raw_versions = params.get("generator_versions") or ""
    names = raw_versions if isinstance(raw_versions, list) else [v for v in str(raw_versions).split(",") if v]
    for name in names:
        name = str(name).strip()
        version_id = as_id(name)
        if version_id is not None:
            versions.append(version_id)
            continue
        gen, _, ver = name.partition("@")
        gv = GeneratorVersion.objects.filter(generator__name=gen, name=ver).first()
        if gv is None:
            raise Invalid(f"no generator version {name!r} (use id or generator@version)")
        versions.append(gv.id)
    return ExportSpec(
        schema=str(params.get("schema") or "trl"),
        format=str(params.get("format") or "jsonl"),
        aggregate=str(params.get("aggregate") or ("none" if params.get("schema") == "raw" else "majority")),
        media=str(params.get("media") or "url"),
        base_url=base_url,
        since=when("since"),
        until=when("until"),
        min_agreement=min_agreement_value,
        exclude_paused=flag("exclude_paused"),
        gold=str(params.get("gold") or "any"),
        aspect=params.get("aspect") or None,
        generator_versions=tuple(versions),
        modality=params.get("modality") or None,
    )


# --- Reading -------------------------------------------------------------------------------------
def _where(project: Project, spec: ExportSpec) -> tuple[list[str], list[Any]]:
    """The filters as SQL over ``annotate_judgment j JOIN annotate_comparison c``."""
    where = ["j.project_id = %s"]
    params: list[Any] = [project.id]
    if spec.since:
        where.append("j.created_at >= %s")
        params.append(spec.since)
    if spec.until:
        where.append("j.created_at < %s")
        params.append(spec.until)
    if spec.gold == "only":
        where.append("c.is_gold")
    elif spec.gold == "exclude":
        where.append("NOT c.is_gold")
    if spec.exclude_paused:
        where.append(
            "NOT EXISTS (SELECT 1 FROM annotate_projectmember m"
            " WHERE m.project_id = j.project_id AND m.user_id = j.annotator_id AND m.paused)"
        )
    if spec.generator_versions:
        where.append(
            "NOT EXISTS (SELECT 1 FROM annotate_comparisonsample cs2"
            " JOIN annotate_sample s2 ON s2.id = cs2.sample_id WHERE cs2.comparison_id = c.id AND (s2.generator_version_id IS NULL"
            " OR NOT s2.generator_version_id = ANY(%s)))"
        )
        params.append(list(spec.generator_versions))
    if spec.modality:
        where.append(
            "NOT EXISTS (SELECT 1 FROM annotate_comparisonsample cs3"
            " JOIN annotate_sample s3 ON s3.id = cs3.sample_id WHERE cs3.comparison_id = c.id AND s3.modality <> %s)"
        )
        params.append(spec.modality)
    return where, params


def judgment_where(project: Project, spec: ExportSpec) -> tuple[list[str], list[Any]]:
    """The export's filters as SQL conditions over ``annotate_judgment j JOIN annotate_comparison
    c`` (for callers that count what an export will hold, e.g. the reward-job launch check)."""
    return _where(project, spec)


def _judgment_sql(project: Project, spec: ExportSpec) -> tuple[str, list[Any]]:
    where, params = _where(project, spec)
    raw = spec.schema == "raw"
    needs_aspects = raw or spec.schema == "aspects" or spec.aspect is not None

    def col(expr: str, needed: bool) -> str:
        # Columns a schema does not use are not read at all (the JSON ones cost most).
        return expr if needed else "NULL"

    sql = f"""
        SELECT j.id, j.comparison_id, j.annotator_id, {col("u.username", raw)}, j.outcome, j.winner_id,
               {col("j.ranking", raw or spec.schema == "ranking")}, {col("j.aspects", needs_aspects)},
               {col("j.rationale", raw)}, {col("j.artifacts", raw)}, {col("j.displayed_order", raw)},
               j.time_spent_ms, j.source, {col("j.created_at", raw or spec.schema == "pickapic")}, c.prompt_id, c.is_gold, {col("c.gold_answer", raw)}
        FROM annotate_judgment j
        JOIN annotate_comparison c ON c.id = j.comparison_id
        {"JOIN auth_user u ON u.id = j.annotator_id" if raw else ""}
        WHERE {" AND ".join(where)}
        ORDER BY j.comparison_id, j.id
    """
    return sql, params


def count_judgments(*, project: Project, spec: ExportSpec) -> int:
    sql, params = _judgment_sql(project, spec)
    with connection.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM ({sql}) q", params)
        row = cur.fetchone()
    return int(row[0]) if row else 0


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class _Vote(tuple):
    """One judgment row as the cursor returned it; JSON columns are parsed only when read."""

    __slots__ = ()
    id = property(itemgetter(0))
    annotator_id = property(itemgetter(2))
    username = property(itemgetter(3))
    outcome = property(itemgetter(4))
    winner = property(itemgetter(5))
    ranking = property(lambda self: _json(self[6]))
    aspects = property(lambda self: _json(self[7]) or {})
    rationale = property(itemgetter(8))
    artifacts = property(lambda self: _json(self[9]) or [])
    displayed = property(lambda self: _json(self[10]) or [])
    time_spent_ms = property(itemgetter(11))
    source = property(itemgetter(12))
    created_at = property(itemgetter(13))


@dataclass
class _Comparison:
    id: int
    prompt_id: int
    is_gold: bool
    gold_answer: Any
    samples: list[int]
    votes: list[_Vote]


def _comparisons(
    project: Project, spec: ExportSpec
) -> Iterator[tuple[list[_Comparison], dict[int, Any], dict]]:
    """Yield (comparisons, samples by id, prompts by id) per chunk, from a server-side cursor.

    The export runs in one REPEATABLE READ transaction: every row comes from the same snapshot,
    and the cursor is a plain (not WITH HOLD) one, which PostgreSQL streams instead of
    materialising the whole result before the first row."""
    sql, params = _judgment_sql(project, spec)
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost:  # inside a caller's transaction (tests, snapshots in a task) its level holds
            with connection.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield from _chunks(sql, params, spec)


def _chunks(
    sql: str, params: list[Any], spec: ExportSpec
) -> Iterator[tuple[list[_Comparison], dict[int, Any], dict]]:
    cursor = connection.chunked_cursor()
    try:
        cursor.execute(sql, params)
        pending: _Comparison | None = None
        while True:
            rows = cursor.fetchmany(CHUNK)
            done: list[_Comparison] = []
            for r in rows:
                vote = _Vote(r)
                if pending is None or pending.id != r[1]:
                    if pending is not None:
                        done.append(pending)
                    pending = _Comparison(
                        id=r[1],
                        prompt_id=r[14],
                        is_gold=r[15],
                        gold_answer=_json(r[16]),
                        samples=[],
                        votes=[],
                    )
                pending.votes.append(vote)
            if not rows and pending is not None:
                done.append(pending)
                pending = None
            if done:
                yield done, *_lookups(done, with_bytes=spec.media == "bytes")
            if not rows:
                return
    finally:
        cursor.close()


def _lookups(comparisons: list[_Comparison], *, with_bytes: bool) -> tuple[dict[int, Any], dict[int, str]]:
    """The samples (canonical order per comparison) and prompts one chunk needs: two queries."""
    prompt_ids = sorted({c.prompt_id for c in comparisons})
    samples: dict[int, Any] = {}
    prompts: dict[int, str] = {}
    with connection.cursor() as cur:
        cur.execute(
            "SELECT comparison_id, array_agg(sample_id ORDER BY position) FROM annotate_comparisonsample"
            " WHERE comparison_id = ANY(%s) GROUP BY comparison_id",
            [[c.id for c in comparisons]],
        )
        order = dict(cur.fetchall())
        for c in comparisons:
            c.samples = list(order.get(c.id) or [])
        sample_ids = sorted({sid for c in comparisons for sid in c.samples})
        cur.execute(
            "SELECT s.id, s.modality, s.text, s.media, s.mime_type, s.content_hash, g.name, v.name"
            " FROM annotate_sample s LEFT JOIN annotate_generatorversion v ON v.id = s.generator_version_id"
            " LEFT JOIN annotate_generator g ON g.id = v.generator_id WHERE s.id = ANY(%s)",
            [sample_ids],
        )
        for sid, modality, text, media, mime, chash, gen, ver in cur.fetchall():
            samples[sid] = {
                "id": sid,
                "modality": modality,
                "text": text,
                "media": media,
                "mime_type": mime,
                "content_hash": chash,
                "model": f"{gen}@{ver}" if gen else None,
            }
        cur.execute("SELECT id, text FROM annotate_prompt WHERE id = ANY(%s)", [prompt_ids])
        prompts = dict(cur.fetchall())
    if with_bytes:
        from django.core.files.storage import default_storage

        for s in samples.values():
            if s["modality"] != "text" and s["media"]:
                with default_storage.open(s["media"], "rb") as fh:
                    s["bytes"] = fh.read()
    return samples, prompts


# --- Aggregation ---------------------------------------------------------------------------------
def _tally(outcomes: Iterable[str]) -> Counter[str]:
    return Counter(o for o in outcomes if o)


def _majority(tally: Counter[str]) -> tuple[str, float]:
    """The most voted outcome and its share. An A/B draw is a tie."""
    total = sum(tally.values())
    if not total:
        return "", 0.0
    best = max(tally.values())
    leaders = sorted(o for o, n in tally.items() if n == best)
    if len(leaders) == 1:
        return leaders[0], best / total
    if set(leaders) >= {"a", "b"} or "tie" in leaders:
        return "tie", best / total
    return leaders[0], best / total


def _soft(tally: Counter[str]) -> tuple[float, float]:
    """Share of A and of B among A/B/tie votes, ties counting half to each."""
    decided = tally["a"] + tally["b"] + tally["tie"]
    if not decided:
        return 0.5, 0.5
    a = (tally["a"] + 0.5 * tally["tie"]) / decided
    return a, 1.0 - a


def _outcome_of(vote: _Vote, aspect: str | None) -> str:
    if aspect is None:
        return vote.outcome
    return vote.aspects.get(aspect, "")


# --- Row builders --------------------------------------------------------------------------------
class _Rows:
    def __init__(self, spec: ExportSpec, project: Project) -> None:
        self.spec = spec
        self.project = project
        self.aspect_keys = [a["key"] for a in project.aspects]
        if spec.aspect is not None and spec.aspect not in self.aspect_keys:
            raise Invalid(f"unknown aspect {spec.aspect!r}; this project has {self.aspect_keys}")

    def media(self, sample: dict[str, Any]) -> Any:
        if sample["modality"] == "text":
            return sample["text"]
        if self.spec.media == "bytes":
            return sample["bytes"]
        return f"{self.spec.base_url}/media/samples/{sample['id']}?v={sample['content_hash'][:12]}"

    def rows(
        self, c: _Comparison, samples: dict[int, Any], prompts: dict[int, str]
    ) -> Iterator[dict[str, Any]]:
        builder: Callable[..., Iterator[dict[str, Any]]] = getattr(self, f"_{self.spec.schema}")
        if self.spec.aggregate == "none" or self.spec.schema == "raw":
            groups = [[v] for v in c.votes]
        else:
            groups = [c.votes]
        for votes in groups:
            if len(votes) == 1:  # no aggregation to do: the common case of aggregate=none
                outcome = _outcome_of(votes[0], self.spec.aspect) or ""
                tally = Counter({outcome: 1} if outcome else {})
                agreement = 1.0 if outcome else 0.0
            else:
                tally = _tally(_outcome_of(v, self.spec.aspect) for v in votes)
                outcome, agreement = _majority(tally)
            if self.spec.min_agreement is not None and agreement < self.spec.min_agreement:
                continue
            yield from builder(c, votes, tally, outcome, agreement, samples, prompts[c.prompt_id])

    def _common(self, c: _Comparison, votes: list[_Vote], agreement: float) -> dict[str, Any]:
        return {"comparison_id": c.id, "num_votes": len(votes), "agreement": round(agreement, 6)}

    def _trl(self, c, votes, tally, outcome, agreement, samples, prompt):
        if len(c.samples) != 2 or outcome not in ("a", "b"):
            return
        win, lose = (c.samples[0], c.samples[1]) if outcome == "a" else (c.samples[1], c.samples[0])
        yield {"prompt": prompt, "chosen": self.media(samples[win]), "rejected": self.media(samples[lose])}

    def _pickapic(self, c, votes, tally, outcome, agreement, samples, prompt):
        if len(c.samples) != 2 or outcome in ("", "both_bad"):
            return
        s0, s1 = samples[c.samples[0]], samples[c.samples[1]]
        if self.spec.aggregate == "soft":
            label_0, label_1 = _soft(tally)
        else:
            label_0, label_1 = {"a": (1.0, 0.0), "b": (0.0, 1.0)}.get(outcome, (0.5, 0.5))
        single = votes[0] if len(votes) == 1 else None
        yield {
            "caption": prompt,
            "jpg_0": self.media(s0),
            "jpg_1": self.media(s1),
            "label_0": label_0,
            "label_1": label_1,
            "model_0": s0["model"],
            "model_1": s1["model"],
            "image_0_uid": s0["content_hash"],
            "image_1_uid": s1["content_hash"],
            "user_id": single.annotator_id if single else None,
            "created_at": (single or votes[-1]).created_at.isoformat(),
            "are_different": s0["content_hash"] != s1["content_hash"],
            "has_label": True,
            **self._common(c, votes, agreement),
        }

    def _aspects(self, c, votes, tally, outcome, agreement, samples, prompt):
        names = {"a": "A", "b": "B", "tie": "same", "both_bad": "same"}
        row = {
            "prompt": prompt,
            "sample_A": self.media(samples[c.samples[0]]),
            "sample_B": self.media(samples[c.samples[1]]) if len(c.samples) > 1 else None,
            "overall": names.get(_majority(_tally(v.outcome for v in votes))[0]),
        }
        for key in self.aspect_keys:
            row[key] = names.get(_majority(_tally(v.aspects.get(key, "") for v in votes))[0])
        yield {**row, **self._common(c, votes, agreement)}

    def _ranking(self, c, votes, tally, outcome, agreement, samples, prompt):
        # Borda count over the votes' rankings; pairwise wins are 2-rankings, ties/both-bad none.
        points: Counter[int] = Counter()
        counted = 0
        for v in votes:
            rank = v.ranking or (
                [c.samples[0], c.samples[1]]
                if v.outcome == "a"
                else [c.samples[1], c.samples[0]]
                if v.outcome == "b"
                else None
            )
            if not rank:
                continue
            counted += 1
            for pos, sid in enumerate(rank):
                points[sid] += len(rank) - 1 - pos
        if not counted:
            return
        order = sorted(c.samples, key=lambda sid: (-points[sid], c.samples.index(sid)))
        yield {
            "prompt": prompt,
            "samples": [self.media(samples[sid]) for sid in c.samples],
            "sample_ids": c.samples,
            "ranking": order,
            **self._common(c, votes, agreement),
        }

    def _raw(self, c, votes, tally, outcome, agreement, samples, prompt):
        for v in votes:
            yield {
                "judgment_id": v.id,
                "comparison_id": c.id,
                "prompt": prompt,
                "sample_ids": c.samples,
                "samples": [self.media(samples[sid]) for sid in c.samples],
                "models": [samples[sid]["model"] for sid in c.samples],
                "annotator": v.username,
                "annotator_id": v.annotator_id,
                "outcome": v.outcome,
                "winner": v.winner,
                "ranking": v.ranking,
                "displayed_order": v.displayed,
                "aspects": v.aspects,
                "artifacts": v.artifacts,
                "rationale": v.rationale,
                "time_spent_ms": v.time_spent_ms,
                "source": v.source,
                "is_gold": c.is_gold,
                "gold_answer": c.gold_answer,
                "created_at": v.created_at.isoformat(),
            }


def iter_rows(*, project: Project, spec: ExportSpec) -> Iterator[dict[str, Any]]:
    """Every row of the export, streamed."""
    builder = _Rows(spec, project)
    for comparisons, samples, prompts in _comparisons(project, spec):
        for c in comparisons:
            yield from builder.rows(c, samples, prompts)


# --- Writers -------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _jsonl(rows: Iterable[dict[str, Any]], *, binary: bool = False) -> Iterator[bytes]:
    import orjson

    buf: list[bytes] = []
    for row in rows:
        if binary:
            row = {k: _plain(v) for k, v in row.items()}
        buf.append(orjson.dumps(row))
        if len(buf) >= 1000:
            buf.append(b"")
            yield b"\n".join(buf)
            buf = []
    if buf:
        buf.append(b"")
        yield b"\n".join(buf)


def _csv(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    out = io.StringIO()
    writer: csv.DictWriter[str] | None = None
    for i, row in enumerate(rows):
        flat = {
            k: json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else _plain(v)
            for k, v in row.items()
        }
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(flat))
            writer.writeheader()
        writer.writerow(flat)
        if i % 500 == 499:
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    if out.getvalue():
        yield out.getvalue().encode()


class _Drain(io.RawIOBase):
    """A write-only sink whose bytes are taken out as they come (Parquet written as a stream)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        b = bytes(data)
        self.chunks.append(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks = []
        return data


def arrow_schema(spec: ExportSpec, aspect_keys: list[str]) -> Any:
    """The Parquet column types of each export schema (fixed, so that every row group agrees)."""
    import pyarrow as pa

    m = pa.binary() if spec.media == "bytes" else pa.string()
    s, i, f, b = pa.string(), pa.int64(), pa.float64(), pa.bool_()
    agg = [("comparison_id", i), ("num_votes", i), ("agreement", f)]
    cols: dict[str, list[tuple[str, Any]]] = {
        "trl": [("prompt", s), ("chosen", m), ("rejected", m)],
        "pickapic": [
            ("caption", s),
            ("jpg_0", m),
            ("jpg_1", m),
            ("label_0", f),
            ("label_1", f),
            ("model_0", s),
            ("model_1", s),
            ("image_0_uid", s),
            ("image_1_uid", s),
            ("user_id", i),
            ("created_at", s),
            ("are_different", b),
            ("has_label", b),
            *agg,
        ],
        "aspects": [
            ("prompt", s),
            ("sample_A", m),
            ("sample_B", m),
            ("overall", s),
            *[(k, s) for k in aspect_keys],
            *agg,
        ],
        "ranking": [
            ("prompt", s),
            ("samples", pa.list_(m)),
            ("sample_ids", pa.list_(i)),
            ("ranking", pa.list_(i)),
            *agg,
        ],
        "raw": [
            ("judgment_id", i),
            ("comparison_id", i),
            ("prompt", s),
            ("sample_ids", pa.list_(i)),
            ("samples", pa.list_(m)),
            ("models", pa.list_(s)),
            ("annotator", s),
            ("annotator_id", i),
            ("outcome", s),
            ("winner", i),
            ("ranking", pa.list_(i)),
            ("displayed_order", pa.list_(i)),
            ("aspects", s),
            ("artifacts", s),
            ("rationale", s),
            ("time_spent_ms", i),
            ("source", s),
            ("is_gold", b),
            ("gold_answer", s),
            ("created_at", s),
        ],
    }
    return pa.schema(cols[spec.schema])


def _arrow_converter(typ: Any) -> Callable[[Any], Any] | None:
    """How to turn one Python value into what a column of Arrow type ``typ`` takes: JSON text for
    dicts/lists in string columns, bytes for text in binary columns; None means as it is. Built
    once per column, so the per-value cost is one call (or none)."""
    import pyarrow as pa

    if pa.types.is_string(typ):
        return lambda v: json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v
    if pa.types.is_binary(typ):
        return lambda v: v.encode() if isinstance(v, str) else v  # a text sample in a bytes export
    if pa.types.is_list(typ):
        inner = _arrow_converter(typ.value_type)
        if inner is None:
            return None
        return lambda v: [None if x is None else inner(x) for x in v]
    return None


def _parquet(rows: Iterable[dict[str, Any]], schema: Any, row_group: int = 10_000) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = _Drain()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    columns = [(f.name, _arrow_converter(f.type)) for f in schema]
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch.clear()

    for row in rows:
        out = {}
        for name, convert in columns:
            value = row.get(name)
            out[name] = value if convert is None or value is None else convert(value)
        batch.append(out)
        if len(batch) >= row_group:
            flush()
            yield sink.take()
    flush()
    writer.close()
    yield sink.take()


def _writer(project: Project, spec: ExportSpec) -> Callable[[Iterable[dict[str, Any]]], Iterator[bytes]]:
    if spec.format == "parquet":
        schema = arrow_schema(spec, [a["key"] for a in project.aspects])
        return lambda rows: _parquet(rows, schema)
    if spec.format == "jsonl":
        return lambda rows: _jsonl(rows, binary=spec.media == "bytes")
    return _csv


# --- Fast path: TRL rows built by PostgreSQL ------------------------------------------------------
# The most pulled export (TRL pairs as JSONL, media as URLs) is built in SQL: PostgreSQL makes the
# JSON text and Python only moves bytes, several times the rows per second of the general path.
# It follows the same rules (majority with A/B draws as ties, ties and both-bad left out,
# min_agreement) and tests check that both paths give the same rows.
_MEDIA_SQL = (
    "CASE WHEN {s}.modality = 'text' THEN {s}.text"
    " ELSE %(base)s || '/media/samples/' || {s}.id || '?v=' || left({s}.content_hash, 12) END"
)
_MAJORITY_SQL = """
    CASE WHEN (na = m)::int + (nb = m)::int + (nt = m)::int + (nbb = m)::int = 1
              THEN CASE WHEN na = m THEN 'a' WHEN nb = m THEN 'b' WHEN nt = m THEN 'tie' ELSE 'both_bad' END
         WHEN (na = m AND nb = m) OR nt = m THEN 'tie'
         ELSE CASE WHEN na = m THEN 'a' WHEN nb = m THEN 'b' ELSE 'both_bad' END END
"""


def _fast_trl_sql(project: Project, spec: ExportSpec) -> tuple[str, dict[str, Any]] | None:
    if not (
        spec.schema == "trl"
        and spec.format == "jsonl"
        and spec.media == "url"
        and spec.aspect is None
        and spec.aggregate in ("none", "majority")
    ):
        return None
    where, params = _where(project, spec)
    named: dict[str, Any] = {f"p{i}": v for i, v in enumerate(params)}
    cond = " AND ".join(where)
    for i in range(len(params)):  # positional placeholders -> named, in order
        cond = cond.replace("%s", f"%(p{i})s", 1)
    named["base"] = spec.base_url
    pick = """
        JOIN annotate_prompt p ON p.id = c.prompt_id
        JOIN LATERAL (SELECT array_agg(cs.sample_id ORDER BY cs.position) AS ids FROM annotate_comparisonsample cs
                      WHERE cs.comparison_id = c.id) e ON cardinality(e.ids) = 2
        JOIN annotate_sample s0 ON s0.id = e.ids[1]
        JOIN annotate_sample s1 ON s1.id = e.ids[2]
    """
    row = (
        "json_build_object('prompt', p.text,"
        " 'chosen', CASE WHEN v.outcome = 'a' THEN "
        + _MEDIA_SQL.format(s="s0")
        + " ELSE "
        + _MEDIA_SQL.format(s="s1")
        + " END,"
        " 'rejected', CASE WHEN v.outcome = 'a' THEN "
        + _MEDIA_SQL.format(s="s1")
        + " ELSE "
        + _MEDIA_SQL.format(s="s0")
        + " END"
        ")::text"
    )
    if spec.aggregate == "none":
        sql = f"""
            SELECT {row} FROM (
                SELECT j.id, j.comparison_id, j.outcome FROM annotate_judgment j
                JOIN annotate_comparison c ON c.id = j.comparison_id
                WHERE {cond} AND j.outcome IN ('a', 'b')
            ) v
            JOIN annotate_comparison c ON c.id = v.comparison_id {pick}
            ORDER BY v.comparison_id, v.id
        """
        return sql, named
    min_agreement = "" if spec.min_agreement is None else "AND t.m::float8 / t.n >= %(min_agreement)s"
    named["min_agreement"] = spec.min_agreement
    sql = f"""
        SELECT {row} FROM (
            SELECT t.comparison_id, {_MAJORITY_SQL} AS outcome FROM (
                SELECT t0.*, GREATEST(t0.na, t0.nb, t0.nt, t0.nbb) AS m FROM (
                    SELECT j.comparison_id,
                           count(*) FILTER (WHERE j.outcome = 'a') AS na,
                           count(*) FILTER (WHERE j.outcome = 'b') AS nb,
                           count(*) FILTER (WHERE j.outcome = 'tie') AS nt,
                           count(*) FILTER (WHERE j.outcome = 'both_bad') AS nbb,
                           count(*) FILTER (WHERE j.outcome <> '') AS n
                    FROM annotate_judgment j JOIN annotate_comparison c ON c.id = j.comparison_id
                    WHERE {cond}
                    GROUP BY j.comparison_id
                ) t0
            ) t
            WHERE t.n > 0 {min_agreement}
        ) v
        JOIN annotate_comparison c ON c.id = v.comparison_id {pick}
        WHERE v.outcome IN ('a', 'b')
        ORDER BY v.comparison_id
    """
    return sql, named


def _fast_stream(sql: str, params: dict[str, Any]) -> Iterator[bytes]:
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost:
            with connection.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor = connection.chunked_cursor()
        try:
            cursor.execute(sql, params)
            while True:
                rows = cursor.fetchmany(5000)
                if not rows:
                    return
                yield ("\n".join(r[0] for r in rows) + "\n").encode()
        finally:
            cursor.close()


def stream(*, project: Project, spec: ExportSpec) -> Iterator[bytes]:
    """The export as a byte stream in ``spec.format``."""
    fast = _fast_trl_sql(project, spec)
    if fast is not None:
        yield from _fast_stream(*fast)
        return
    yield from _writer(project, spec)(iter_rows(project=project, spec=spec))


def write(
    *, project: Project, spec: ExportSpec, out: IO[bytes], progress: Callable[[int], None] | None = None
) -> tuple[int, str, int]:
    """Write the export to ``out``; returns (rows, sha256 of the bytes, size)."""
    counter = {"rows": 0}

    def counted(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            counter["rows"] += 1
            if progress and counter["rows"] % 1000 == 0:
                progress(counter["rows"])
            yield row

    h = hashlib.sha256()
    size = 0
    fast = _fast_trl_sql(project, spec)
    if fast is not None:
        for chunk in _fast_stream(*fast):
            counter["rows"] += chunk.count(b"\n")  # JSON text never holds a raw newline
            if progress:
                progress(counter["rows"])
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
        return counter["rows"], h.hexdigest(), size
    for chunk in _writer(project, spec)(counted(iter_rows(project=project, spec=spec))):
        h.update(chunk)
        size += len(chunk)
        out.write(chunk)
    if progress:
        progress(counter["rows"])
    return counter["rows"], h.hexdigest(), size
