"""Projects with judged comparisons for reward-model tests, made through the real services.

``simulate`` is the simulated annotator of ``simulate.annotators`` with a rule over Sample rows
as its hidden preference and some label noise, judging through the labeling services the REST
views call (``sim.ServiceClient``): fast enough for the many tests that need judged projects."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from annotate import services
from annotate.models import Project, Sample
from simulate import annotators as sim


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
    """Judge every comparison ``annotator`` can get (at most ``limit``) with the one simulated
    annotator (``simulate.annotators``), through the labeling services. ``rule`` returns the
    winner's sample id (or ``"tie"``, ``"both_bad"``); with probability ``noise`` a verdict is
    flipped (seeded by ``seed``); ``aspects`` gives each aspect's verdict the same way, noise
    included; ``artifacts`` picks the shown samples to flag ``blur``. Returns judgments made."""
    keys = [str(a["key"]) for a in project.aspects]
    profile = sim.Profile(
        sim.Rule(rule),
        noise=noise,
        seed=seed,
        # No callable: no aspect outcomes at all (not the overall verdict copied to each).
        aspects={} if aspects is None else {k: sim.Rule(_aspect(aspects, k)) for k in keys},
        artifacts=artifacts,
    )
    judge = sim.SimulatedAnnotator(sim.ServiceClient(annotator), project.slug, profile)
    # Stop at the first empty lease and never wait: a refusal is a bug in the test, shown at once.
    result = judge.run(max_labels=limit, idle_polls=1, idle_wait_s=0.0)
    assert not result.errors, result.errors
    return result.labels


def _aspect(
    aspects: Callable[[Sample, Sample], dict[str, int | str]], key: str
) -> Callable[[Sample, Sample], int | str]:
    return lambda a, b: aspects(a, b)[key]
