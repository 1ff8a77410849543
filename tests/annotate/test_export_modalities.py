"""``schema=pickapic`` holds images only (jpg_0/jpg_1): a project with videos or texts is refused
with a 400 unless the export asks for ``modality=image``, which keeps its image comparisons."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from annotate import services
from annotate.models import Comparison, Sample
from tests.factories import client_for, mp4_bytes, png_bytes, rows_digest
from tests.rewards.helpers import simulate

pytestmark = pytest.mark.django_db


def _mixed(make_project: Any, manager: Any, annotator: Any) -> Any:
    project = make_project("mixed", annotators=(annotator,))
    for i, colour in enumerate([(250, 0, 0), (90, 0, 0)]):
        services.sample_create_media(
            project=project,
            actor=manager,
            file=io.BytesIO(png_bytes(colour)),
            filename=f"{i}.png",
            prompt="img",
        )
    for seed in (0, 1):
        services.sample_create_media(
            project=project,
            actor=manager,
            file=io.BytesIO(mp4_bytes(seed=seed)),
            filename=f"{seed}.mp4",
            prompt="clip",
        )
    services.sample_create_texts(
        project=project,
        actor=manager,
        items=[{"prompt": "question", "text": f"**answer** {v}"} for v in ("a", "b")],
    )
    services.comparisons_create_random_pairs(project=project, actor=manager, pairs_per_prompt=1, seed=0)
    assert simulate(project, annotator, lambda a, b: min(a.id, b.id), noise=0.0) == 3
    return project


def test_pickapic_refuses_a_mixed_project_and_exports_its_images_on_request(
    make_project: Any, manager: Any, annotator: Any
) -> None:
    project = _mixed(make_project, manager, annotator)
    c = client_for(manager)
    before = rows_digest()
    r = c.get("/api/projects/mixed/export/?schema=pickapic&format=jsonl")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "pickapic_images_only"
    assert error["message"] == (
        "schema=pickapic holds images only (jpg_0, jpg_1) and this project has text and video "
        "samples: add modality=image to export only its image comparisons, or use schema=trl or raw"
    )
    assert rows_digest() == before

    r = c.get("/api/projects/mixed/export/?schema=pickapic&format=jsonl&modality=image&media=bytes")
    assert r.status_code == 200
    rows = [json.loads(line) for line in r.getvalue().decode().splitlines()]
    (image_cmp,) = Comparison.objects.filter(prompt__text="img")
    first, second = (e.sample for e in image_cmp.entries.order_by("position"))
    assert [(row["comparison_id"], row["caption"]) for row in rows] == [(image_cmp.id, "img")]
    assert (rows[0]["image_0_uid"], rows[0]["image_1_uid"]) == (first.content_hash, second.content_hash)
    # The simulated judge picked the lower id: the first sample in canonical order.
    assert (rows[0]["label_0"], rows[0]["label_1"]) == ((1.0, 0.0) if first.id < second.id else (0.0, 1.0))
    assert Sample.objects.filter(project=project).count() == 6


def test_pickapic_on_single_modality_projects(make_project: Any, manager: Any, annotator: Any) -> None:
    images = make_project("pics", modality="image", annotators=(annotator,))
    for i, colour in enumerate([(250, 0, 0), (90, 0, 0), (10, 10, 10)]):
        services.sample_create_media(
            project=images, actor=manager, file=io.BytesIO(png_bytes(colour)), filename=f"{i}.png", prompt="p"
        )
    services.comparisons_create_random_pairs(project=images, actor=manager, pairs_per_prompt=3, seed=0)
    simulate(images, annotator, lambda a, b: min(a.id, b.id), noise=0.0)
    c = client_for(manager)
    r = c.get("/api/projects/pics/export/?schema=pickapic&format=jsonl")
    assert r.status_code == 200
    assert len(r.getvalue().decode().splitlines()) == 3

    texts = make_project("words", modality="text", annotators=(annotator,))
    services.sample_create_texts(
        project=texts, actor=manager, items=[{"prompt": "q", "text": t} for t in ("one", "two")]
    )
    r = c.get("/api/projects/words/export/?schema=pickapic&format=jsonl")
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(
        "schema=pickapic holds images only (jpg_0, jpg_1) and this project has text samples"
    )
    # Snapshots take the same spec and are refused the same way.
    r = c.post("/api/projects/words/snapshots/", {"schema": "pickapic"}, format="json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "pickapic_images_only"
