"""Celery task of the simulate app: simulated annotators judging a project in the worker, through
the app's request stack in-process (the same API a person's browser uses)."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="simulate.tasks.simulate_annotators")
def simulate_annotators(
    project_id: int,
    *,
    annotators: int = 3,
    preference: str = "brightness",
    noise: float = 0.1,
    position_bias: float = 0.0,
    spammers: float = 0.0,
    think_ms: float = 0.0,
    labels: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the annotators until each made ``labels`` judgments or nothing is left; returns the
    totals (judgments, skips, errors)."""
    from simulate.services import simulated_annotators_run

    return simulated_annotators_run(
        project_id=project_id, annotators=annotators, preference=preference, noise=noise,
        position_bias=position_bias, spammers=spammers, think_ms=think_ms, labels=labels, seed=seed,
    )  # fmt: skip
