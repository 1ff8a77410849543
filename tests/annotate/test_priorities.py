"""Queue priorities: active learning reorders the comparisons whose priority is not fixed; fixed
ones (the loop's versus verdicts) keep their order, are served first, and are handed back."""

from __future__ import annotations

from typing import Any

import pytest

from annotate import selectors, services
from annotate.models import Comparison

pytestmark = pytest.mark.django_db


def test_fixed_priorities_are_left_alone_until_released(
    make_project: Any, annotator: Any, text_pairs: Any
) -> None:
    project = make_project(modality="text", annotators=(annotator,))
    free = text_pairs(project, n=2)
    fixed = text_pairs(project, n=2, priority=10.5, priority_fixed=True)
    assert [c for c, _, _ in selectors.comparisons_open_pairs(project_id=project.id)] == free
    changed = services.comparison_priorities_set(
        project_id=project.id, priorities=[(c, 0.9) for c in free + fixed]
    )
    assert changed == 2
    rows = dict(Comparison.objects.filter(project=project).values_list("id", "priority"))
    assert [rows[c] for c in free + fixed] == [0.9, 0.9, 10.5, 10.5]
    # `next` serves the fixed ones first.
    served = services.assignment_next(project=project, annotator=annotator, n=2)
    assert sorted(a.comparison_id for a in served) == fixed
    # Released: no longer fixed, back at the given priority, reordered like the rest.
    assert services.comparison_priorities_release(project_id=project.id, comparison_ids=fixed + free) == 2
    assert not Comparison.objects.filter(project=project, priority_fixed=True).exists()
    assert Comparison.objects.get(id=fixed[0]).priority == 0.0
    assert services.comparison_priorities_set(project_id=project.id, priorities=[(fixed[0], 0.3)]) == 1
    assert Comparison.objects.get(id=fixed[0]).priority == 0.3
