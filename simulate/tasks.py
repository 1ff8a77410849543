"""Celery task of the simulate app: simulated annotators judging a project in the worker, through
the app's request stack in-process (the same API a person's browser uses)."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="simulate.tasks.simulate_annotators")
def simulate_annotators(project_id: int, **settings: Any) -> dict[str, Any]:
    """``simulate.services.simulated_annotators_run`` for a project (``settings``: its keyword
    arguments: annotators, preference, noise, position_bias, spammers, think_ms, labels, seed);
    returns the totals (judgments, skips, errors)."""
    from simulate.services import simulated_annotators_run

    return simulated_annotators_run(project_id=project_id, **settings)
