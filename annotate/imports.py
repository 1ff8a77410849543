"""Datasets in: samples in bulk (media + manifest) and existing preference data as judgments.

Every import is all or nothing: the rows are read and checked first, with errors naming the row,
and then written in one transaction; media files written before a failure are removed. The
manifest is streamed and media entries are read and decoded one at a time (checking keeps only
their description), then re-read batch by batch when written, so what a worker holds in memory
does not grow with the upload (a small zip can inflate a thousandfold), and the transaction
holds no locks while media decodes.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from annotate.bulk import COPY_NULL as NULL
from annotate.bulk import TableCopier, bulk_load_settings, reserve_ids_many
from annotate.errors import Conflict, Invalid, ServiceError, TooLarge
from annotate.media import MediaError, MediaInfo, MediaTooLarge, inspect_media, inspect_text
from annotate.models import (
    Comparison,
    ComparisonSample,
    Judgment,
    Modality,
    Project,
    ProjectMember,
    Prompt,
    Sample,
)
from annotate.selectors import member_role_require
from annotate.services import (
    generator_version_get_or_create,
    prompt_get_or_create,
    prompt_key,
    prompts_get_or_create,
    sample_build,
    with_media_extra,
)
from annotate.validation import check_json, clean_text

Progress = Callable[[int], None] | None
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")


@dataclass
class ImportResult:
    rows: int = 0
    created: int = 0
    duplicates: int = 0
    comparisons: int = 0
    judgments: int = 0
    sample_ids: list[int] = field(default_factory=list)
    skipped: int = 0  # broken rows left out (on_error="skip")
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)  # {row, reason}, the first SKIP_REPORT


ON_ERROR = ("fail", "skip")
SKIP_REPORT = 1000  # skipped rows listed with their reason; the count covers them all


class _Skips:
    """Where ``on_error="skip"`` puts the broken rows; ``None`` of it (fail) re-raises."""

    def __init__(self, result: ImportResult) -> None:
        self.result = result

    def add(self, row: int, exc: ServiceError) -> None:
        self.result.skipped += 1
        if len(self.result.skipped_rows) < SKIP_REPORT:
            self.result.skipped_rows.append({"row": row, "reason": exc.message})


# --- Sources: a zip file or a folder -------------------------------------------------------------
class _Source:
    """Files of an upload, addressed by relative POSIX path; nothing outside it is reachable."""

    def __init__(self, path_or_file: Path | IO[bytes]) -> None:
        self.zip: zipfile.ZipFile | None = None
        self.root: Path | None = None
        if isinstance(path_or_file, Path) and path_or_file.is_dir():
            self.root = path_or_file.resolve()
        else:
            try:
                self.zip = zipfile.ZipFile(path_or_file)
            except (zipfile.BadZipFile, OSError) as exc:
                raise Invalid(
                    "the upload is not a zip file (expected a .zip with a manifest and media)"
                ) from exc

    def _safe(self, name: str, row: int) -> str:
        p = PurePosixPath(name.replace("\\", "/"))
        if not name or p.is_absolute() or ".." in p.parts:
            raise Invalid(f"row {row}: path {name!r} points outside the upload", details={"row": row})
        return str(p)

    def read(self, name: str, row: int, limit: int) -> bytes:
        rel = self._safe(name, row)
        if self.zip is not None:
            try:
                info = self.zip.getinfo(rel)
            except KeyError as exc:
                raise Invalid(f"row {row}: {rel!r} is not in the upload", details={"row": row}) from exc
            if info.file_size > limit:
                raise TooLarge(
                    f"row {row}: {rel} is {info.file_size} bytes; the limit is {limit}", details={"row": row}
                )
            try:
                with self.zip.open(info) as fh:
                    data = fh.read(limit + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise Invalid(
                    f"row {row}: {rel} is damaged in the zip ({exc})", details={"row": row}
                ) from exc
        else:
            assert self.root is not None
            target = (self.root / rel).resolve()
            if not target.is_relative_to(self.root):  # a symlink leading out
                raise Invalid(f"row {row}: path {name!r} points outside the upload", details={"row": row})
            if not target.is_file():
                raise Invalid(f"row {row}: {rel!r} is not in the upload", details={"row": row})
            with target.open("rb") as fh:
                data = fh.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"row {row}: {rel} is over the {limit}-byte limit", details={"row": row})
        return data

    def open_text(self, name: str) -> IO[str] | None:
        """A top-level text file of the upload as a UTF-8 stream (read as it is iterated), or None."""
        if self.zip is not None:
            try:
                info = self.zip.getinfo(name)
            except KeyError:
                return None
            return io.TextIOWrapper(self.zip.open(info), encoding="utf-8-sig", newline="")
        assert self.root is not None
        target = (self.root / name).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target.open(encoding="utf-8-sig", newline="")

    def manifest(self, name: str | None) -> tuple[str, IO[str]]:
        names = [name] if name else list(MANIFEST_NAMES)
        for n in names:
            stream = self.open_text(n)
            if stream is not None:
                return n, stream
        raise Invalid(f"no manifest in the upload (expected {' or '.join(names)} at its top level)")


def _json_row(i: int, line: str) -> dict[str, Any]:
    """Row ``i`` of a JSONL file: one JSON object, or ``Invalid`` naming the row."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise Invalid(f"row {i}: not valid JSON ({getattr(exc, 'msg', exc)})", details={"row": i}) from exc
    if not isinstance(row, dict):
        raise Invalid(f"row {i}: expected a JSON object", details={"row": i})
    return row


def _manifest_rows(name: str, stream: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Numbered rows of a manifest, read line by line (a manifest can be larger than memory)."""
    i = 0
    try:
        if name.endswith(".csv"):
            reader = csv.DictReader(stream)
            for i, row in enumerate(reader, start=1):
                yield i, {k.strip(): (v if v != "" else None) for k, v in row.items() if k}
            return
        for i, line in enumerate(stream, start=1):
            if line.strip():
                yield i, _json_row(i, line)
    except csv.Error as exc:
        raise Invalid(f"row {i + 1}: unreadable CSV ({exc})", details={"row": i + 1}) from exc
    except UnicodeDecodeError as exc:
        raise Invalid(f"{name}: row {i + 1} is not UTF-8 text", details={"row": i + 1}) from exc
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise Invalid(f"{name} is damaged in the zip ({exc})") from exc


# --- Samples in bulk -----------------------------------------------------------------------------
def samples_import(
    *,
    project: Project,
    actor: Any,
    source: Path | IO[bytes],
    manifest: str | None = None,
    progress: Progress = None,
) -> ImportResult:
    """Import samples from a zip (or, from the CLI, a folder) holding ``manifest.jsonl`` or
    ``manifest.csv`` with columns ``prompt``, ``path`` (media) or ``text``, and optionally
    ``generator``, ``generator_version``, ``metadata``. Duplicates (same content hash) are
    counted, not stored twice."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    src = _Source(source)
    name, stream = src.manifest(manifest)
    result = ImportResult()
    limit = max(settings.RL_MAX_IMAGE_BYTES, settings.RL_MAX_VIDEO_BYTES)
    # Pass 1, outside any transaction: every row checked and every media entry read and decoded,
    # one at a time; only what describes it (MediaInfo, no bytes) is kept.
    planned: list[tuple[int, dict[str, Any], MediaInfo]] = []
    seen: set[tuple[str, str]] = set()
    with stream:
        for i, raw in _manifest_rows(name, stream):
            result.rows += 1
            row = _manifest_row(i, raw)
            try:
                if row["path"] is not None:
                    info = inspect_media(io.BytesIO(src.read(row["path"], i, limit)))
                else:
                    info = inspect_text(row["text"])
            except MediaTooLarge as exc:
                raise TooLarge(f"row {i}: {exc}", details={"row": i}) from exc
            except MediaError as exc:
                raise Invalid(f"row {i}: {row['path'] or 'text'}: {exc}", details={"row": i}) from exc
            if project.modality and info.modality != project.modality:
                raise Invalid(
                    f"row {i}: this project takes {project.modality} samples, not {info.modality}",
                    details={"row": i},
                )
            if (row["prompt"], info.content_hash) in seen:
                result.duplicates += 1
            else:
                seen.add((row["prompt"], info.content_hash))
                planned.append((i, row, info))
            if progress:
                progress(result.rows)
    # Pass 2, one transaction: batches of rows (bounded in rows and in media bytes) written with
    # one insert each; media re-read from the upload batch by batch.
    prompts: dict[str, Any] = {}
    versions: dict[tuple[str, str], Any] = {}
    written: list[Sample] = []

    def write(batch: list[tuple[int, dict[str, Any], MediaInfo]]) -> None:
        existing = set(
            Sample.objects.filter(
                project=project, content_hash__in=[info.content_hash for _, _, info in batch]
            ).values_list("prompt__text", "content_hash")
        )
        rows: list[Sample] = []
        for i, row, info in batch:
            if (row["prompt"], info.content_hash) in existing:
                result.duplicates += 1
                continue
            try:
                prompt = prompts.get(row["prompt"])
                if prompt is None:
                    prompt = prompts[row["prompt"]] = prompt_get_or_create(
                        project=project, text=row["prompt"]
                    )
                key = (row["generator"], row["generator_version"])
                if key not in versions:
                    versions[key] = generator_version_get_or_create(generator=key[0], version=key[1])
                sample = sample_build(
                    project=project,
                    prompt=prompt,
                    gv=versions[key],
                    info=info,
                    metadata=row["metadata"],
                    text=row["text"] if row["path"] is None else "",
                )
            except Invalid as exc:
                raise Invalid(f"row {i}: {exc.message}", details={"row": i}) from exc
            if row["path"] is not None:
                data = src.read(row["path"], i, limit)
                sample.media.save(f"import.{info.extension}", ContentFile(data), save=False)
                written.append(sample)
            rows.append(sample)
        Sample.objects.bulk_create(rows)
        result.created += len(rows)
        result.sample_ids += [s.id for s in rows]

    try:
        with transaction.atomic():
            batch: list[tuple[int, dict[str, Any], MediaInfo]] = []
            held = 0
            for item in planned:
                batch.append(item)
                held += item[2].byte_size if item[1]["path"] is not None else 0
                if held >= _BATCH_BYTES or len(batch) >= _BATCH_ROWS:
                    write(batch)
                    batch, held = [], 0
            write(batch)
    except IntegrityError as exc:  # the same content stored by a concurrent upload
        for s in written:
            s.media.delete(save=False)
        raise Conflict("some of these samples were stored by another upload meanwhile; import again") from exc
    except BaseException:
        for s in written:
            s.media.delete(save=False)
        raise
    return result


# At most this much media (or this many rows) is held before it is written: memory stays bounded
# whatever the upload inflates to, and each dedupe query stays far below PostgreSQL's 65,535
# parameters.
_BATCH_BYTES = 32 * 1024 * 1024
_BATCH_ROWS = 1000


def _manifest_row(i: int, row: dict[str, Any]) -> dict[str, Any]:
    """One manifest row checked and normalised (no media read yet)."""

    def cell(name: str, max_length: int | None = None) -> str:
        value = row.get(name)
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise Invalid(f"row {i}: {name!r} must be a string", details={"row": i})
        try:
            return clean_text(str(value), field=name, max_length=max_length)
        except Invalid as exc:
            raise Invalid(f"row {i}: {exc.message}", details={"row": i}) from exc

    prompt = cell("prompt")
    if not prompt.strip():
        raise Invalid(f"row {i}: missing column 'prompt'", details={"row": i})
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise Invalid(f"row {i}: 'metadata' is not a JSON object", details={"row": i}) from exc
    if not isinstance(meta, dict):
        raise Invalid(f"row {i}: 'metadata' is not a JSON object", details={"row": i})
    try:
        check_json(meta, field="metadata")
    except Invalid as exc:
        raise Invalid(f"row {i}: {exc.message}", details={"row": i}) from exc
    path = cell("path", 1000) or None
    text = row.get("text")
    if path is None and not isinstance(text, str):
        raise Invalid(f"row {i}: needs a 'path' (image/video) or a 'text' column", details={"row": i})
    return {
        "prompt": prompt,
        "path": path,
        "text": cell("text") if path is None else "",
        "generator": cell("generator", 200).strip(),
        "generator_version": cell("generator_version", 200).strip(),
        "metadata": meta,
    }


# --- Preferences ---------------------------------------------------------------------------------
def _import_user(kind: str) -> Any:
    user, _ = get_user_model().objects.get_or_create(
        username=f"import-{kind}", defaults={"is_active": False, "email": ""}
    )
    return user


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest shared prefix: a binary search over slice comparisons, which run in
    C (a character loop in Python costs more than the rest of a row's import)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    hi -= 1  # a[:lo] == b[:lo] holds; the answer is at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _as_text(value: Any) -> str:
    """A TRL string, or a conversation (list of messages) rendered as markdown."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n\n".join(
            str(m["content"])
            if m.get("role") in (None, "assistant")
            else f"**{m.get('role')}:** {m['content']}"
            for m in value
        )
    raise ValueError("expected a string or a list of {role, content} messages")


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's implicit-prompt format: chosen and rejected share the conversation prefix, which is
    the prompt. Conversations split at the last shared message; strings at the shared prefix,
    backed off to a whitespace boundary so no word is cut."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = _common_prefix(chosen, rejected)
        while k > 0 and not chosen[k - 1].isspace():
            k -= 1
        return chosen[:k], chosen[k:], rejected[k:]
    raise ValueError("chosen and rejected must both be strings or both be conversations")


@dataclass
class _Pair:
    row: int
    prompt: str
    first: tuple[MediaInfo, str | bytes]
    second: tuple[MediaInfo, str | bytes]
    outcome: str  # a, b or tie, in (first, second) order
    models: tuple[str, str] = ("", "")
    # Set by _chunks, in the reader thread: services.prompt_key(prompt), and each side's metadata
    # as JSON (work taken off the writer, which the database waits on).
    prompt_key: str = ""
    metadata: tuple[str, str] = ("", "")


def _decode(i: int, raw: bytes) -> str:
    """Line ``i`` as text; a line that is not UTF-8 is refused with its number."""
    try:
        return raw.decode("utf-8-sig" if i == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(
            f"row {i}: not UTF-8 text ({exc.reason} at byte {exc.start})", details={"row": i}
        ) from exc


def _trl_pairs(fh: IO[bytes], skips: _Skips | None = None) -> Iterator[_Pair]:
    """The rows of a TRL JSONL file; a broken row raises ``Invalid`` naming it, or with ``skips`` is
    recorded there and left out."""
    for i, raw_bytes in enumerate(fh, start=1):
        try:
            raw = _decode(i, raw_bytes)
            if not raw.strip():
                continue
            yield _trl_row(i, raw)
        except (Invalid, TooLarge) as exc:
            if skips is None:
                raise
            skips.add(i, exc)


def _trl_row(i: int, raw: str) -> _Pair:
    row = _json_row(i, raw)
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise Invalid(f"row {i}: missing column(s) {', '.join(missing)}", details={"row": i})
    try:
        if "prompt" in row and row["prompt"] not in (None, ""):
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        else:
            prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        prompt_text, chosen_text, rejected_text = (
            clean_text(_as_text(v), field=name)
            for v, name in ((prompt, "prompt"), (chosen, "chosen"), (rejected, "rejected"))
        )
    except Invalid as exc:
        raise Invalid(f"row {i}: {exc.message}", details={"row": i}) from exc
    except ValueError as exc:
        raise Invalid(f"row {i}: {exc}", details={"row": i}) from exc
    if not prompt_text.strip():
        raise Invalid(
            f"row {i}: empty prompt (no explicit 'prompt' and no shared prefix)", details={"row": i}
        )
    try:
        # An empty completion is a real output (the assistant said nothing), often the preferred one.
        first = (inspect_text(chosen_text, allow_empty=True), chosen_text)
        second = (inspect_text(rejected_text, allow_empty=True), rejected_text)
    except MediaTooLarge as exc:
        raise TooLarge(f"row {i}: {exc}", details={"row": i}) from exc
    except MediaError as exc:
        raise Invalid(f"row {i}: {exc}", details={"row": i}) from exc
    return _Pair(i, prompt_text, first, second, "a")


def _pickapic_pairs(fh: IO[bytes], skips: _Skips | None = None) -> Iterator[_Pair]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    head = fh.read(4)
    fh.seek(0)
    if head != b"PAR1":
        raise Invalid("the file is not Parquet (a Pick-a-Pic style .parquet file is expected)")
    try:
        pf = pq.ParquetFile(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise Invalid(f"unreadable Parquet file: {exc}") from exc
    need = {"caption", "jpg_0", "jpg_1", "label_0", "label_1"}
    missing = need - set(pf.schema_arrow.names)
    if missing:
        raise Invalid(
            f"missing column(s) {', '.join(sorted(missing))}; Pick-a-Pic needs {', '.join(sorted(need))}"
        )
    for row, rec in enumerate(_parquet_records(pf), start=1):
        try:
            yield _pickapic_row(row, rec)
        except (Invalid, TooLarge) as exc:
            if skips is None:
                raise
            skips.add(row, exc)


def _pickapic_row(row: int, rec: dict[str, Any]) -> _Pair:
    l0, l1 = rec.get("label_0"), rec.get("label_1")
    if l0 is None or l1 is None:
        raise Invalid(f"row {row}: label_0/label_1 missing", details={"row": row})
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (l0, l1)):
        raise Invalid(f"row {row}: label_0/label_1 must be numbers", details={"row": row})
    outcome = "a" if l0 > l1 else "b" if l1 > l0 else "tie"
    images = []
    for col in ("jpg_0", "jpg_1"):
        data = rec.get(col)
        if not isinstance(data, bytes | bytearray):
            raise Invalid(f"row {row}: {col} must hold the image bytes", details={"row": row})
        try:
            images.append((inspect_media(io.BytesIO(data)), bytes(data)))
        except MediaTooLarge as exc:
            raise TooLarge(f"row {row}: {col}: {exc}", details={"row": row}) from exc
        except MediaError as exc:
            raise Invalid(f"row {row}: {col}: {exc}", details={"row": row}) from exc
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Invalid(f"row {row}: empty caption", details={"row": row})
    try:
        clean_text(caption, field="caption")
        models = tuple(
            clean_text(str(rec.get(c) or ""), field=c, max_length=401) for c in ("model_0", "model_1")
        )
    except Invalid as exc:
        raise Invalid(f"row {row}: {exc.message}", details={"row": row}) from exc
    return _Pair(
        row,
        caption,
        images[0],
        images[1],
        outcome,
        (models[0], models[1]),
    )


def _parquet_records(pf: Any) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    batches = pf.iter_batches(batch_size=256)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise Invalid(f"unreadable Parquet data: {exc}") from exc
        yield from batch.to_pylist()


def preferences_import(
    *,
    project: Project,
    actor: Any,
    fmt: str,
    file: IO[bytes],
    progress: Progress = None,
    on_error: str = "fail",
) -> ImportResult:
    """Import existing preference data as judgments (source ``import``): TRL-style JSONL (text)
    or Pick-a-Pic-style Parquet (image bytes inside). Each row becomes two samples (deduplicated
    by prompt and content: the same output under two prompts is two samples), a completed
    comparison and one judgment by the ``import-<format>`` user.

    ``on_error="fail"`` (default): one broken row refuses the whole file, naming the row, and
    nothing is stored. ``"skip"``: broken rows are left out and listed in the result
    (``skipped``, ``skipped_rows``); the rest is imported, still in one transaction."""
    member_role_require(project=project, user=actor, roles=(ProjectMember.Role.MANAGER,))
    if on_error not in ON_ERROR:
        raise Invalid(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}", code="bad_on_error")
    if fmt not in ("trl", "pickapic"):
        raise Invalid("format must be trl or pickapic")
    modality = Modality.TEXT if fmt == "trl" else Modality.IMAGE
    if project.modality and project.modality != modality:
        raise Invalid(f"this project takes {project.modality} samples; {fmt} data is {modality}")
    if project.k != 2:
        raise Invalid("preference imports need a pairwise project")
    result = ImportResult()
    skips = _Skips(result) if on_error == "skip" else None
    written: list[str] = []  # media files stored so far, removed if the import fails
    pairs = _trl_pairs(file, skips) if fmt == "trl" else _pickapic_pairs(file, skips)
    try:
        # Reading, parsing and checking (no database) run in a thread a few chunks ahead, while
        # this one writes: PostgreSQL and the parser each get a core.
        with _Prefetch(_chunks(pairs, project=project, fmt=fmt, skips=skips)) as chunks, transaction.atomic():
            # Inside the transaction: a failed import leaves no import user behind.
            user = _import_user(fmt)
            ProjectMember.objects.get_or_create(project=project, user=user, defaults={"role": "annotator"})
            writer = _PairWriter(project=project, user=user, fmt=fmt, result=result, written=written)
            for chunk in chunks:
                writer.write(chunk)
                if progress:
                    progress(result.comparisons)
            writer.finish()
            if not result.comparisons:
                if result.skipped:
                    raise Invalid(
                        f"every row is broken ({result.skipped}); the first: {result.skipped_rows[0]['reason']}",
                        details={"skipped": result.skipped, "skipped_rows": result.skipped_rows[:20]},
                    )
                raise Invalid("the file holds no rows")
    except BaseException:
        for name in written:
            Sample.media.field.storage.delete(name)
        raise
    result.rows = result.comparisons + result.skipped
    return result


# Pairs written per round of set-based writes: each round costs a handful of statements whatever
# its size, so the rate stays flat from the first row to the millionth.
_PAIR_CHUNK = 2000


def _chunks(
    pairs: Iterator[_Pair], *, project: Project, fmt: str, skips: _Skips | None
) -> Iterator[list[_Pair]]:
    """Checked pairs in chunks of ``_PAIR_CHUNK`` pairs or ``_BATCH_BYTES`` of media, whichever
    comes first; no database access (it runs in a thread)."""
    chunk: list[_Pair] = []
    media = 0
    for p in pairs:
        try:
            try:
                p.prompt_key = prompt_key(p.prompt)
            except Invalid as exc:
                raise Invalid(f"row {p.row}: {exc.message}", details={"row": p.row}) from exc
            p.metadata = (
                json.dumps(with_media_extra({"import": fmt, "row": p.row}, p.first[0])),
                json.dumps(with_media_extra({"import": fmt, "row": p.row}, p.second[0])),
            )
            if p.first[0].content_hash == p.second[0].content_hash:
                raise Invalid(f"row {p.row}: both sides are the same content", details={"row": p.row})
            if p.outcome == "tie" and not project.allow_tie:
                raise Invalid(
                    f"row {p.row}: a tie, and this project does not allow ties", details={"row": p.row}
                )
        except Invalid as exc:
            if skips is None:
                raise
            skips.add(p.row, exc)
            continue
        chunk.append(p)
        if len(chunk) % 16 == 0:
            # Hand the GIL to the writer if it is waiting: each of its statements returns to wait
            # for it, and a thread that never blocks keeps it for sys.getswitchinterval() (5 ms).
            time.sleep(0)
        media += sum(len(x) for _, x in (p.first, p.second) if isinstance(x, bytes))
        if len(chunk) >= _PAIR_CHUNK or media >= _BATCH_BYTES:
            yield chunk
            chunk, media = [], 0
    if chunk:
        yield chunk


class _Prefetch:
    """Runs an iterator in a thread, ``depth`` items ahead of the consumer, handing over its items
    and, at the end, its exception. Leaving the ``with`` early (the consumer failed) stops it."""

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int = 2) -> None:
        self.items = items
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="import-reader", daemon=True)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Raised(exc))
            return
        self._put(self._END)

    def __enter__(self) -> Iterator[Any]:
        self.thread.start()
        return self._iter()

    def _iter(self) -> Iterator[Any]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@dataclass
class _Raised:
    exc: BaseException


class _PairWriter:
    """Writes chunks of validated pairs with one query or COPY per table and chunk: prompts,
    samples (reused when the same content is already stored under the same prompt), comparisons,
    their sample positions and the judgments. Rows are built as tuples, not model instances: at a
    million rows the instances would cost more than the database does."""

    SAMPLE_FIELDS = (
        "id", "project_id", "prompt_id", "generator_version_id", "modality", "mime_type", "text", "media",
        "content_hash", "byte_size", "width", "height", "duration", "frames", "fps", "metadata",
    )  # fmt: skip

    def __init__(self, *, project: Project, user: Any, fmt: str, result: ImportResult, written: list[str]):
        self.project, self.user, self.fmt, self.result, self.written = project, user, fmt, result, written
        self.versions: dict[str, int | None] = {}
        now = timezone.now()
        self.samples = TableCopier(Sample, list(self.SAMPLE_FIELDS), now=now)
        self.comparisons = TableCopier(
            Comparison,
            [
                "id",
                "project_id",
                "prompt_id",
                "origin",
                "overlap",
                "slots_taken",
                "judgments_count",
                "status",
            ],
            now=now,
        )
        self.entries = TableCopier(
            ComparisonSample, ["id", "comparison_id", "sample_id", "prompt_id", "position"], now=now
        )
        self.judgments = TableCopier(
            Judgment,
            [
                "id",
                "project_id",
                "comparison_id",
                "annotator_id",
                "outcome",
                "winner_id",
                "displayed_order",
                "source",
            ],
            now=now,
        )
        connection.ensure_connection()
        self.cursor = connection.connection.cursor()  # raw psycopg, same transaction: COPY
        # Foreign keys checked set-wise per chunk where the database allows it (annotate/bulk.py).
        self.load = bulk_load_settings(
            self.cursor, [Prompt, Sample, Comparison, ComparisonSample, Judgment], batch_foreign_keys=True
        )

    def _version(self, row: int, model: str) -> int | None:
        if model not in self.versions:
            gen, _, ver = model.partition("@")
            try:
                gv = generator_version_get_or_create(generator=gen, version=ver)
            except Invalid as exc:
                raise Invalid(f"row {row}: {exc.message}", details={"row": row}) from exc
            self.versions[model] = gv.id if gv is not None else None
        return self.versions[model]

    def _media(self, info: MediaInfo, payload: bytes) -> str:
        """Stores an image's bytes where an uploaded sample's would go; returns the name."""
        holder = Sample(project_id=self.project.id, content_hash=info.content_hash)
        holder.media.save(f"import.{info.extension}", ContentFile(payload), save=False)
        name = str(holder.media.name)
        self.written.append(name)
        return name

    def _known(self, keys: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
        """Ids of the samples already stored under these (prompt, content hash) keys."""
        if not keys:
            return {}
        self.cursor.execute(
            f"SELECT s.prompt_id, s.content_hash, s.id FROM {connection.ops.quote_name(Sample._meta.db_table)} s"
            " JOIN unnest(string_to_array(%s, ',')::bigint[], string_to_array(%s, ',')) AS u(p, h)"
            " ON s.project_id = %s AND s.prompt_id = u.p AND s.content_hash = u.h",
            # Ids and hex hashes as comma-joined strings: far cheaper to send than array parameters.
            (",".join(str(k[0]) for k in keys), ",".join(k[1] for k in keys), self.project.id),
        )
        return {(p, h): sid for p, h, sid in self.cursor.fetchall()}

    def write(self, pairs: list[_Pair]) -> None:
        """Everything that needs an answer from the database first (prompt ids, samples already
        stored, generator versions, all the chunk's new ids in one round trip); then each table's
        rows are built while its COPY streams, so the server is never left waiting on Python."""
        project, result, cur = self.project, self.result, self.cursor
        prompts = prompts_get_or_create(
            project=project, texts=[p.prompt for p in pairs], keys=[p.prompt_key for p in pairs]
        )
        prompt_ids = prompts.ids
        unseen = [(p.row, model) for p in pairs for model in p.models if model not in self.versions]
        if unseen:
            with self.load.row_checks(cur):  # generator tables are not checked by check_written
                for row, model in unseen:
                    self._version(row, model)
        keys = list(
            {
                (prompt_ids[p.prompt], info.content_hash): None
                for p in pairs
                for info, _ in (p.first, p.second)
            }
        )
        # A sample is (prompt, content): the same refusal under two prompts is two samples. Under a
        # prompt created just now nothing is stored yet.
        known = self._known([k for k in keys if k[0] not in prompts.created])
        fresh = [k for k in keys if k not in known]
        ids, cids, entry_ids, jids = reserve_ids_many(
            cur,
            [
                (Sample, len(fresh)),
                (Comparison, len(pairs)),
                (ComparisonSample, 2 * len(pairs)),
                (Judgment, len(pairs)),
            ],
        )
        new = dict(zip(fresh, ids, strict=True))
        known.update(new)
        versions = self.versions

        def samples() -> Iterator[tuple[Any, ...]]:
            for p in pairs:
                prompt_id = prompt_ids[p.prompt]
                for (info, payload), model, meta in zip(
                    (p.first, p.second), p.models, p.metadata, strict=True
                ):
                    sid = new.pop((prompt_id, info.content_hash), None)
                    if sid is None:  # stored before, or earlier in this chunk
                        result.duplicates += 1
                        continue
                    media, text = (
                        (self._media(info, payload), "") if isinstance(payload, bytes) else ("", payload)
                    )
                    yield (
                        sid, project.id, prompt_id, versions[model], info.modality, info.mime_type, text,
                        media, info.content_hash, info.byte_size, info.width, info.height, info.duration,
                        info.frames, info.fps, meta,
                    )  # fmt: skip

        result.created += self.samples.copy(cur, samples())
        complete = Comparison.Status.COMPLETE.value
        origin = Comparison.Origin.IMPORT.value
        # The rows below are integers and fixed words, formatted straight into COPY's text form:
        # psycopg's per-value formatting was the writer's largest cost after the database.
        pj = project.id
        self.comparisons.copy_lines(
            cur,
            (
                f"{cid}\t{pj}\t{prompt_ids[p.prompt]}\t{origin}\t1\t1\t1\t{complete}"
                for p, cid in zip(pairs, cids, strict=True)
            ),
        )
        # The two samples of each pair, by position: (a, b).
        sides = [
            (known[(pid, p.first[0].content_hash)], known[(pid, p.second[0].content_hash)], pid)
            for p in pairs
            for pid in (prompt_ids[p.prompt],)
        ]
        self.entries.copy_lines(
            cur,
            (
                line
                for (a, b, pid), cid, ea, eb in zip(sides, cids, entry_ids[::2], entry_ids[1::2], strict=True)
                for line in (f"{ea}\t{cid}\t{a}\t{pid}\t0", f"{eb}\t{cid}\t{b}\t{pid}\t1")
            ),
        )
        source = Judgment.Source.IMPORT.value
        uid = self.user.id
        self.judgments.copy_lines(
            cur,
            (
                f"{jid}\t{pj}\t{cid}\t{uid}\t{p.outcome}"
                f"\t{a if p.outcome == 'a' else b if p.outcome == 'b' else NULL}\t[{a}, {b}]\t{source}"
                for p, (a, b, _), cid, jid in zip(pairs, sides, cids, jids, strict=True)
            ),
        )
        self.load.check_written(
            cur,
            {
                Prompt._meta.db_table: sorted(prompts.created),
                Sample._meta.db_table: ids,
                Comparison._meta.db_table: cids,
                ComparisonSample._meta.db_table: entry_ids,
                Judgment._meta.db_table: jids,
            },
        )
        result.comparisons += len(pairs)
        result.judgments += len(pairs)

    def finish(self) -> None:
        self.load.finish(self.cursor)


def project_for_import(*, slug: str, actor: Any, fmt: str) -> Project:
    """The project to import into; created (with the actor as manager) when it does not exist."""
    from annotate.services import project_create

    project = Project.objects.filter(slug=slug).first()
    if project is not None:
        return project
    modality = Modality.TEXT if fmt == "trl" else Modality.IMAGE
    return project_create(creator=actor, slug=slug, name=slug, modality=modality)


def pairs_from_rows(rows: Sequence[dict[str, Any]]) -> bytes:
    """TRL JSONL bytes for a list of {prompt, chosen, rejected} dicts (tests and tools)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
