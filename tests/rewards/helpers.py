"""Projects with judged comparisons for reward-model tests, made through the real services.

A simulated annotator judges through ``assignment_next`` + ``judgment_submit`` exactly like a
person would, following a hidden rule with some label noise."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from annotate import services
from annotate.models import Judgment, Project, Sample


def noise_png(brightness: int, seed: int, size: int = 32) -> bytes:
    """A random-pattern image whose mean brightness is about ``brightness / 2``: the pattern differs
    per seed, so a model must pick up brightness, not memorise pictures."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * brightness).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def image_project(
    make_project: Callable[..., Project],
    manager: Any,
    *,
    slug: str = "img",
    prompts: int = 4,
    per_prompt: int = 30,
    pairs_per_prompt: int = 60,
    seed: int = 0,
    **kwargs: Any,
) -> Project:
    project = make_project(slug, modality="image", **kwargs)
    rng = random.Random(seed)
    for p in range(prompts):
        for i in range(per_prompt):
            brightness = rng.randint(20, 255)
            services.sample_create_media(
                project=project,
                actor=manager,
                file=io.BytesIO(noise_png(brightness, seed * 100_000 + p * 1000 + i)),
                filename=f"p{p}-{i}.png",
                prompt=f"a picture number {p}",
                generator="noise",
                generator_version=f"v{i % 3}",
                metadata={"brightness": brightness},
            )
    services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=pairs_per_prompt, seed=seed
    )
    return project


def brighter(a: Sample, b: Sample) -> int:
    return a.id if a.metadata["brightness"] >= b.metadata["brightness"] else b.id


def simulate(
    project: Project,
    annotator: Any,
    rule: Callable[[Sample, Sample], int | str],
    *,
    noise: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    aspects: Callable[[Sample, Sample], dict[str, int | str]] | None = None,
    artifacts: Callable[[Sample], bool] | None = None,
) -> int:
    """Judge every comparison ``annotator`` can get. ``rule`` returns the winner's sample id (or
    ``"tie"``); with probability ``noise`` the verdict is flipped. Returns judgments made."""
    rng = random.Random(seed)
    made = 0
    while limit is None or made < limit:
        leases = services.assignment_next(project=project, annotator=annotator, n=20)
        if not leases:
            break
        for lease in leases:
            shown = [int(s) for s in lease.display_order]
            samples = {s.id: s for s in Sample.objects.filter(id__in=shown)}
            left, right = samples[shown[0]], samples[shown[1]]

            def choice(verdict: int | str, left_id: int = left.id) -> str:
                if verdict in ("tie", "both_bad"):
                    return str(verdict)
                pick = "left" if verdict == left_id else "right"
                if rng.random() < noise:
                    pick = "right" if pick == "left" else "left"
                return pick

            flags = [
                {"sample": s.id, "tags": ["blur"]}
                for s in (left, right)
                if artifacts is not None and artifacts(s)
            ]
            services.judgment_submit(
                project=project,
                annotator=annotator,
                assignment_id=lease.id,
                choice=choice(rule(left, right)),
                aspects={k: choice(v) for k, v in aspects(left, right).items()} if aspects else None,
                artifacts=flags,
                source=Judgment.Source.SIMULATED,
            )
            made += 1
            if limit is not None and made >= limit:
                break
    return made
