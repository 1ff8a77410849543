"""The embedding cache: each (sample, encoder) and (prompt, encoder) is embedded once and stored; heads train from these rows alone."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from django.db import connection

from annotate.errors import Invalid
from annotate.models import Sample
from rewards.models import (
    Encoder,
    PromptEmbedding,
    RewardModelVersion,
    SampleEmbedding,
)
from rewards.services.encoders import encoder_load, encoder_supports, sample_image_open

log = logging.getLogger(__name__)

EMBED_BATCH = 32
INPUTS = ("response", "joint")


def embedding_input(*, encoder: Encoder, text_input: str | None) -> str:
    """The form a job or version embeds its samples in under ``encoder``: ``"joint"`` (prompt and text
    together, one text pair) only for a sentence encoder and a config asking for it; ``"response"`` (the
    sample alone) otherwise, and for configs saved before ``text_input`` existed."""
    return "joint" if text_input == "joint" and encoder.family == "text" else "response"


def config_embedding_input(*, encoder: Encoder, config: dict[str, object] | None) -> str:
    """``embedding_input`` of a saved job config (a config without ``text_input`` predates it: response)."""
    value = (config or {}).get("text_input")
    return embedding_input(encoder=encoder, text_input=value if isinstance(value, str) else None)


def version_embedding_input(version: RewardModelVersion) -> str:
    """The form a registered version's samples are embedded in (what its job trained on)."""
    return config_embedding_input(encoder=version.encoder, config=version.job.config)


def embeddings_ensure(
    *,
    encoder: Encoder,
    sample_ids: Iterable[int],
    frames: int = 8,
    device: str = "cpu",
    input: str = "response",
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed every listed sample and its prompt that has no vector under ``encoder`` in the form ``input``
    yet, in batches. ``input="joint"`` (sentence encoders, text samples only) embeds each sample's prompt
    and text together as one text pair; prompts are always embedded alone.

    Returns how many samples were embedded now (0 when all were cached). Rows are inserted with
    ``ON CONFLICT DO NOTHING``, so two jobs embedding the same samples at once both succeed."""
    if input not in INPUTS:
        raise Invalid(f"unknown embedding input {input!r}; choose one of {', '.join(INPUTS)}")
    if input == "joint" and encoder.family != "text":
        raise Invalid(f"encoder {encoder.name} ({encoder.family}) cannot embed prompt and text together")
    wanted = sorted(set(sample_ids))
    # One array parameter rather than an IN list: a job can touch hundreds of thousands of samples.
    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT s.id, s.prompt_id, e.id IS NOT NULL, pe.id IS NOT NULL
            FROM annotate_sample s
            LEFT JOIN rewards_sampleembedding e
                ON e.sample_id = s.id AND e.encoder_id = %s AND e.input = %s
            LEFT JOIN rewards_promptembedding pe ON pe.prompt_id = s.prompt_id AND pe.encoder_id = %s
            WHERE s.id = ANY(%s)
            """,
            [encoder.id, input, encoder.id, wanted],
        )
        rows = cur.fetchall()
    todo = sorted(sid for sid, _, has, _ in rows if not has)
    prompts_todo_set = {pid for _, pid, _, has_prompt in rows if not has_prompt}
    prompts_todo = sorted(prompts_todo_set)
    total = len(todo) + len(prompts_todo)
    if total == 0:
        return 0
    model = encoder_load(encoder, device)
    done = 0
    for start in range(0, len(todo), EMBED_BATCH):
        batch = list(
            Sample.objects.filter(id__in=todo[start : start + EMBED_BATCH])
            .select_related("prompt")
            .order_by("id")
        )
        new_rows: list[SampleEmbedding] = []
        for modality in ("image", "video", "text"):
            group = [s for s in batch if s.modality == modality]
            if not group:
                continue
            if not encoder_supports(encoder, modality):
                raise Invalid(f"encoder {encoder.name} ({encoder.family}) cannot embed {modality} samples")
            if input == "joint" and modality != "text":
                raise Invalid(f"only text samples can be embedded with their prompt, not {modality} samples")
            if modality == "image":
                vecs = model.embed_images([sample_image_open(s) for s in group])
                new_rows += [_embedding_row(encoder, s, vecs[i : i + 1], input) for i, s in enumerate(group)]
            elif modality == "text" and input == "joint":
                vecs = model.embed_text_pairs([s.prompt.text for s in group], [s.text for s in group])
                new_rows += [_embedding_row(encoder, s, vecs[i : i + 1], input) for i, s in enumerate(group)]
            elif modality == "text":
                vecs = model.embed_texts([s.text for s in group])
                new_rows += [_embedding_row(encoder, s, vecs[i : i + 1], input) for i, s in enumerate(group)]
            else:
                video, mask = model.embed_videos([s.media.path for s in group], frames=frames)
                new_rows += [
                    _embedding_row(encoder, s, video[i][mask[i]], input) for i, s in enumerate(group)
                ]
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


def _embedding_row(encoder: Encoder, sample: Sample, vectors: np.ndarray, input: str) -> SampleEmbedding:
    return SampleEmbedding(
        sample=sample,
        encoder=encoder,
        input=input,
        count=int(vectors.shape[0]),
        vectors=np.ascontiguousarray(vectors, dtype=np.float16).tobytes(),
    )


def features_load(
    *, encoder: Encoder, sample_ids: Sequence[int], input: str = "response"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached features of ``sample_ids`` in that order, in the form ``input``: ``x (S, K, D)``,
    ``mask (S, K)`` and the prompt vectors ``(S, D)``. Every sample must be embedded already.

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
            WHERE e.encoder_id = %s AND e.input = %s AND e.sample_id = ANY(%s::bigint[])
            """,
            [encoder.id, input, ids.tolist()],
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
            f"{len(missing)} sample(s) have no cached {input} embedding (or prompt embedding) under "
            f"{encoder.name}, "
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
