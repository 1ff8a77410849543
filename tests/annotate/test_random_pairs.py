"""Random pairs are drawn without listing every pair of a prompt (m samples: m(m-1)/2 pairs)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from django.db import connection

from annotate import services
from annotate.models import ComparisonSample, Sample

pytestmark = pytest.mark.django_db


def _bulk_texts(project: Any, prompt: Any, n: int, versions: int) -> list[tuple[int, int | None]]:
    gvs = [services.generator_version_get_or_create(generator="g", version=f"v{i}") for i in range(versions)]
    rows = [
        Sample(
            project=project,
            prompt=prompt,
            generator_version=gvs[i % versions],
            modality="text",
            text=f"t{i}",
            content_hash=f"{i:064x}",
        )
        for i in range(n)
    ]
    Sample.objects.bulk_create(rows, batch_size=5000)
    return [(s.id, s.generator_version_id) for s in rows]


def _pairs(project: Any) -> list[frozenset[int]]:
    by: dict[int, set[int]] = {}
    for cid, sid in ComparisonSample.objects.filter(comparison__project=project).values_list(
        "comparison_id", "sample_id"
    ):
        by.setdefault(cid, set()).add(sid)
    return [frozenset(v) for v in by.values()]


def test_a_prompt_with_3000_samples_draws_pairs_in_bounded_memory(manager: Any, make_project: Any) -> None:
    project = make_project("many", modality="text")
    prompt = services.prompt_get_or_create(project=project, text="one prompt")
    samples = _bulk_texts(project, prompt, 3000, versions=3)
    version = dict(samples)
    tracemalloc.start()
    created = services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=50, seed=1
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(created) == 50
    # Listing the 4.5 M pairs held +345 MB; drawing 50 holds a few MB (the sample list itself).
    assert peak < 30 * 1024 * 1024, peak
    pairs = _pairs(project)
    assert len(set(pairs)) == 50 and all(len(p) == 2 for p in pairs)
    # Across generator versions first: with three versions, every drawn pair is a cross pair.
    assert all(len({version[s] for s in p}) == 2 for p in pairs)
    # A second draw never repeats a pair that exists.
    services.comparisons_create_random_pairs(project=project, actor=manager, pairs_per_prompt=50, seed=2)
    again = _pairs(project)
    assert len(again) == 100 and len(set(again)) == 100


def test_small_prompts_are_exhausted_exactly(manager: Any, make_project: Any) -> None:
    project = make_project("few", modality="text")
    prompt = services.prompt_get_or_create(project=project, text="p")
    samples = _bulk_texts(project, prompt, 5, versions=1)
    created = services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=100, seed=0
    )
    assert len(created) == 10  # all 5*4/2 pairs, no more
    assert set(_pairs(project)) == {
        frozenset((a[0], b[0])) for i, a in enumerate(samples) for b in samples[i + 1 :]
    }
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM annotate_comparison WHERE project_id = %s", [project.id])
        assert cur.fetchone()[0] == 10
