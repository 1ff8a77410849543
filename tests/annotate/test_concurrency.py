"""Concurrent `next` calls over real connections: no slot is ever handed out twice."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from django.db import connection

from annotate.models import Assignment, Comparison
from tests.factories import client_for

pytestmark = pytest.mark.django_db(transaction=True)


def _hammer(clients: list[Any], url: str) -> list[Any]:
    barrier = threading.Barrier(len(clients))
    results: list[Any] = [None] * len(clients)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = clients[i].get(url)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("overlap", [1, 2])
def test_twenty_annotators_at_once(make_user: Any, make_project: Any, text_pairs: Any, overlap: int) -> None:
    users = [make_user(f"c{i}") for i in range(20)]
    project = make_project("conc", annotators=tuple(users), overlap=overlap)
    text_pairs(project, n=25)
    clients = [client_for(u) for u in users]
    results = _hammer(clients, "/api/projects/conc/next/?n=3")
    assert all(r.status_code == 200 for r in results), [r.status_code for r in results]
    slots = 25 * overlap
    first = Counter(i["comparison"] for r in results for i in r.json()["items"])
    assert 0 < sum(first.values()) <= min(60, slots)
    assert max(first.values()) <= overlap
    # SKIP LOCKED may leave a slot for a later call; a second round hands out the rest.
    again = _hammer(clients, "/api/projects/conc/next/?n=3")
    handed = [i["comparison"] for r in again for i in r.json()["items"]]
    assert len(handed) == min(60, slots)
    per_comparison = Counter(handed)
    assert max(per_comparison.values()) <= overlap
    for r in again:  # nobody gets one comparison twice
        mine = [i["comparison"] for i in r.json()["items"]]
        assert len(mine) == len(set(mine))
    assert Assignment.objects.count() == len(handed)
    for c in Comparison.objects.filter(project=project):
        assert c.slots_taken == per_comparison.get(c.id, 0)


def test_one_annotator_twenty_tabs(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("tabs", annotators=(annotator,))
    text_pairs(project, n=30)
    results = _hammer([client_for(annotator) for _ in range(20)], "/api/projects/tabs/next/?n=2")
    assert all(r.status_code == 200 for r in results)
    leases = {tuple(i["assignment"] for i in r.json()["items"]) for r in results}
    assert len(leases) == 1  # every tab sees the same two leases
    assert Assignment.objects.count() == 2
