"""The database itself refuses rows that break the invariants, whatever the Python code does."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotate import services
from annotate.models import Assignment, Comparison, ComparisonSample, Judgment, Sample

pytestmark = pytest.mark.django_db


def _texts(project: Any, manager: Any, prompt: str, n: int) -> list[Sample]:
    res = services.sample_create_texts(
        project=project,
        actor=manager,
        items=[{"prompt": prompt, "text": f"{prompt} answer {i}"} for i in range(n)],
    )
    return [r.sample for r in res]


def test_comparison_samples_must_share_the_prompt(manager: Any, make_project: Any) -> None:
    project = make_project("db1")
    a, _b = _texts(project, manager, "first", 2)
    (c,) = _texts(project, manager, "second", 1)
    cmp = Comparison.objects.create(project=project, prompt=a.prompt)
    with pytest.raises(IntegrityError), transaction.atomic():
        ComparisonSample.objects.create(comparison=cmp, sample=a, prompt=a.prompt, position=0)
        ComparisonSample.objects.create(comparison=cmp, sample=c, prompt=a.prompt, position=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        ComparisonSample.objects.create(comparison=cmp, sample=a, prompt=a.prompt, position=0)
        ComparisonSample.objects.create(comparison=cmp, sample=a, prompt=a.prompt, position=1)
    assert ComparisonSample.objects.count() == 0


def test_prompt_of_another_project_is_refused(manager: Any, make_project: Any) -> None:
    p1 = make_project("db2")
    p2 = make_project("db3")
    (a,) = _texts(p1, manager, "x", 1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Comparison.objects.create(project=p2, prompt=a.prompt)


def test_one_judgment_per_annotator_and_slots_within_overlap(
    manager: Any, annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("db4", annotators=(annotator,))
    (cid,) = text_pairs(project, n=1)
    (lease,) = services.assignment_next(project=project, annotator=annotator)
    services.judgment_submit(project=project, annotator=annotator, assignment_id=lease.id, choice="left")
    j = Judgment.objects.get()
    with pytest.raises(IntegrityError), transaction.atomic():
        Judgment.objects.create(
            project=project,
            comparison_id=cid,
            annotator=annotator,
            outcome="tie",
            displayed_order=j.displayed_order,
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        Comparison.objects.filter(id=cid).update(slots_taken=2)
    now = timezone.now()
    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(
            project=project,
            comparison_id=cid,
            annotator=annotator,
            display_order=[],
            leased_at=now,
            expires_at=now,
        )
    assert Judgment.objects.count() == 1
