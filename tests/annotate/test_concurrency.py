"""Concurrent `next` calls over real connections: no slot is ever handed out twice."""

from __future__ import annotations

import threading
import time
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


def test_lease_expiring_during_submit_stores_nothing(
    annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    """`submit` reads the lease without locking it and takes the lock with its final update. If
    lease expiry gets there first (it runs concurrently, from beat), the submit is refused and its
    judgment insert is undone: the expired slot is not also counted as judged."""
    from datetime import timedelta

    from django.db import connections
    from django.utils import timezone

    from annotate import services
    from annotate.errors import Conflict
    from annotate.models import Judgment

    project = make_project("race", annotators=(annotator,), lease_seconds=10)
    text_pairs(project, n=2)
    (lease,) = services.assignment_next(project=project, annotator=annotator)
    expiry_locked = threading.Event()
    release = threading.Event()

    def expire_slowly() -> None:
        # Another connection expires the lease and holds its transaction open for a moment.
        with connections["default"].cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(
                "UPDATE annotate_assignment SET status = 'expired', finished_at = now() WHERE id = %s",
                [lease.id],
            )
            cur.execute(
                "UPDATE annotate_comparison SET slots_taken = slots_taken - 1 WHERE id = %s",
                [lease.comparison_id],
            )
            expiry_locked.set()
            release.wait(10)
            cur.execute("COMMIT")
        connections["default"].close()

    other = threading.Thread(target=expire_slowly)
    other.start()
    assert expiry_locked.wait(10)
    threading.Timer(0.5, release.set).start()  # the submit below blocks on the lease row until then
    started = time.monotonic()
    with pytest.raises(Conflict, match="this lease was expired; fetch a new comparison"):
        services.judgment_submit(
            project=project,
            annotator=annotator,
            assignment_id=lease.id,
            choice="left",
            now=timezone.now() + timedelta(seconds=1),
        )
    # It read the lease as active, inserted, then waited for the expiry's lock on its update.
    assert time.monotonic() - started >= 0.4
    other.join(10)
    assert Judgment.objects.count() == 0
    cmp = Comparison.objects.get(id=lease.comparison_id)
    assert (cmp.status, cmp.slots_taken, cmp.judgments_count) == ("open", 0, 0)
    assert Assignment.objects.get(id=lease.id).status == "expired"
