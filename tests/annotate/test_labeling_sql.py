"""`next` and `submit` run as PostgreSQL functions (migration 0005). These tests pin what the
functions decide that the older API tests do not reach: the exact payload, aspects and artifacts,
staff without a membership, messages, refusals inside a caller's transaction, and results that
stay right once PostgreSQL switches to its cached generic plans."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction

from annotate import services
from annotate.errors import Conflict, Invalid, NotFound
from annotate.models import Assignment, Comparison, ComparisonSample, Judgment, Sample
from tests.factories import client_for, png_bytes

pytestmark = pytest.mark.django_db


def _canonical(comparison_id: int) -> list[int]:
    return list(
        ComparisonSample.objects.filter(comparison_id=comparison_id)
        .order_by("position")
        .values_list("sample_id", flat=True)
    )


def test_next_payload_is_exact_for_images(manager: Any, annotator: Any, make_project: Any) -> None:
    project = make_project("img", annotators=(annotator,), modality="image", allow_both_bad=False)
    up = client_for(manager)
    for color in [(200, 0, 0), (0, 200, 0)]:
        r = up.post(
            "/api/projects/img/samples/",
            {
                "file": SimpleUploadedFile("a.png", png_bytes(color), content_type="image/png"),
                "prompt": "a red or green square",
            },
            format="multipart",
        )
        assert r.status_code == 201, r.json()
    ids = list(Sample.objects.filter(project=project).order_by("id").values_list("id", flat=True))
    (cmp,) = services.comparisons_create(project=project, actor=manager, specs=[{"samples": ids}])
    r = client_for(annotator).get("/api/projects/img/next/")
    assert r.status_code == 200
    assert r["Content-Type"] == "application/json"
    body = r.json()
    lease = Assignment.objects.get()
    samples = {s.id: s for s in Sample.objects.filter(id__in=ids)}
    assert body == {
        "items": [
            {
                "assignment": lease.id,
                "comparison": cmp.id,
                "expires_at": body["items"][0]["expires_at"],
                "prompt": {"id": samples[ids[0]].prompt_id, "text": "a red or green square"},
                "samples": [
                    {
                        "id": sid,
                        "modality": "image",
                        "url": f"/media/samples/{sid}?v={samples[sid].content_hash[:12]}",
                        "text": None,
                        "mime_type": "image/png",
                        "width": 32,
                        "height": 24,
                        "duration": None,
                        "fps": None,
                    }
                    for sid in lease.display_order
                ],
            }
        ],
        "options": {"tie": True, "both_bad": False},
        "aspects": [],
        "mode": "pairwise",
    }
    assert datetime.fromisoformat(body["items"][0]["expires_at"]) == lease.expires_at
    # JSON whatever the client accepts (the endpoint does no content negotiation), and a second
    # call hands back the same held lease.
    again = client_for(annotator).get("/api/projects/img/next/", HTTP_ACCEPT="text/html")
    assert again.status_code == 200
    assert again["Content-Type"] == "application/json"
    assert again.json() == body
    assert sorted(lease.display_order) == sorted(ids)


def test_no_work_still_gives_the_options(annotator: Any, make_project: Any) -> None:
    make_project("empty", annotators=(annotator,), allow_tie=False, aspects=[{"key": "alignment"}])
    r = client_for(annotator).get("/api/projects/empty/next/?n=3")
    assert r.status_code == 200
    assert r.json() == {
        "items": [],
        "options": {"tie": False, "both_bad": True},
        "aspects": [{"key": "alignment", "label": "alignment"}],
        "mode": "pairwise",
    }


def test_aspects_map_through_the_displayed_order(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project(
        "asp", annotators=(annotator,), aspects=[{"key": "fidelity"}, {"key": "alignment"}], allow_tie=False
    )
    text_pairs(project, n=1)
    c = client_for(annotator)
    lease = c.get("/api/projects/asp/next/").json()["items"][0]
    a = lease["assignment"]
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"choice": "left", "aspects": {"color": "left", "zeta": "x"}},
         "unknown aspects ['color', 'zeta']; this project has ['alignment', 'fidelity']"),
        ({"choice": "left", "aspects": {"fidelity": "middle"}},
         "aspect 'fidelity' must be one of left, right, tie, both_bad"),
        ({"choice": "left", "aspects": {"fidelity": "tie"}}, "this project does not allow ties"),
        # A sample id that is in no comparison of this project (ids start at 1 in a fresh database).
        ({"choice": "right", "artifacts": [{"sample": lease["samples"][0]["id"]}, {"sample": 10**9}]},
         "artifact 1: 'sample' must be one of the comparison's samples"),
    ]  # fmt: skip
    for extra, message in refusals:
        r = c.post("/api/projects/asp/judgments/", {"assignment": a, **extra}, format="json")
        assert r.status_code == 400, extra
        assert r.json()["error"]["message"] == message
    assert Judgment.objects.count() == 0
    assert Assignment.objects.get(id=a).status == "active"
    shown = [s["id"] for s in lease["samples"]]
    r = c.post(
        "/api/projects/asp/judgments/",
        {
            "assignment": a,
            "choice": "right",
            "aspects": {"fidelity": "left", "alignment": "both_bad"},
            "artifacts": [{"sample": str(shown[0]), "tags": ["blur"], "regions": [[1, 2, 3.5, 4]]}],
            "rationale": "  right reads better  ",
            "time_spent_ms": 1234,
        },
        format="json",
    )
    assert r.status_code == 201, r.json()
    j = Judgment.objects.get()
    canonical = _canonical(j.comparison_id)
    assert j.displayed_order == shown
    assert j.winner_id == shown[1]
    assert j.outcome == ("a" if shown[1] == canonical[0] else "b")
    assert j.aspects == {"fidelity": "a" if shown[0] == canonical[0] else "b", "alignment": "both_bad"}
    assert j.artifacts == [{"sample": shown[0], "tags": ["blur"], "regions": [[1, 2, 3.5, 4]]}]
    assert (j.rationale, j.time_spent_ms, j.source) == ("right reads better", 1234, "api")
    out = r.json()
    # PostgreSQL writes ISO 8601 without trailing zeros in the fraction: compare as instants.
    assert datetime.fromisoformat(out["judgment"].pop("created_at")) == j.created_at
    assert out == {
        "judgment": {"id": j.id, "comparison": j.comparison_id, "outcome": j.outcome, "winner": j.winner_id}
    }
    cmp = Comparison.objects.get(id=j.comparison_id)
    assert (cmp.status, cmp.judgments_count, cmp.slots_taken) == ("complete", 1, 1)


def test_staff_without_membership_label_and_strangers_do_not(
    make_user: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("staff")
    text_pairs(project, n=2)
    boss = make_user("boss", staff=True)
    stranger = make_user("stranger")
    assert not project.members.filter(user=boss).exists()
    r = client_for(stranger).get("/api/projects/staff/next/")
    assert r.status_code == 404
    assert r.json()["error"] == {"code": "not_found", "message": "no project 'staff'", "details": {}}
    c = client_for(boss)
    lease = c.get("/api/projects/staff/next/").json()["items"][0]
    r = client_for(stranger).post(
        "/api/projects/staff/judgments/", {"assignment": lease["assignment"], "choice": "left"}, format="json"
    )
    assert r.status_code == 404
    r = c.post(
        "/api/projects/staff/judgments/?next=1",
        {"assignment": lease["assignment"], "choice": "left"},
        format="json",
    )
    assert r.status_code == 201
    assert [i["comparison"] for i in r.json()["next"]["items"]] != [lease["comparison"]]
    assert Judgment.objects.get().annotator_id == boss.id


def test_refusal_inside_a_transaction_leaves_it_usable(
    annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("tx", annotators=(annotator,))
    text_pairs(project, n=2)
    with transaction.atomic():
        (lease,) = services.assignment_next(project=project, annotator=annotator)
        with pytest.raises(NotFound, match=f"no lease {lease.id + 999} in project tx"):
            services.judgment_submit(project=project, annotator=annotator, assignment_id=lease.id + 999)
        with pytest.raises(Invalid, match="choice must be one of"):
            services.judgment_submit(project=project, annotator=annotator, assignment_id=lease.id)
        # The savepoint rolled back; this transaction still works and sees its own lease.
        result = services.judgment_submit(
            project=project, annotator=annotator, assignment_id=lease.id, choice="left", idempotency_key="k1"
        )
        assert result.created
        again = services.judgment_submit(
            project=project, annotator=annotator, assignment_id=lease.id, choice="right", idempotency_key="k1"
        )
        assert (again.created, again.judgment.id, again.judgment.winner_id) == (
            False,
            result.judgment.id,
            lease.display_order[0],
        )
        with pytest.raises(Conflict, match="you already judged this comparison"):
            services.judgment_submit(
                project=project, annotator=annotator, assignment_id=lease.id, choice="left"
            )
    assert Judgment.objects.count() == 1


def test_many_labels_in_one_connection_stay_right(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    """PostgreSQL plans the functions' queries generically after a few calls on one connection;
    every label before and after must land where the displayed order says."""
    project = make_project("many", annotators=(annotator,))
    text_pairs(project, n=30)
    body = json.loads(services.labeling_next(slug="many", annotator=annotator, n=2))
    held = [i["assignment"] for i in body["items"]]
    seen = set(held)
    for k in range(24):
        choice = "left" if k % 3 else "right"
        item = body["items"][0]
        previous = [i["assignment"] for i in body["items"]]
        done = services.labeling_submit(
            slug="many", annotator=annotator, assignment_id=item["assignment"], choice=choice, next_n=2
        )
        body = json.loads(done.body)["next"]
        j = Judgment.objects.get(id=done.judgment_id)
        shown = [s["id"] for s in item["samples"]]
        assert j.winner_id == (shown[0] if choice == "left" else shown[1])
        assert j.displayed_order == shown
        # The lease still held comes back first, then one new one.
        assert len(body["items"]) == 2
        assert body["items"][0]["assignment"] == previous[1]
        new = [i["assignment"] for i in body["items"] if i["assignment"] not in seen]
        assert len(new) == 1
        seen.update(new)
    assert Judgment.objects.count() == 24
    assert Assignment.objects.filter(status="active").count() == 2
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM annotate_comparison c WHERE c.project_id = %s AND c.slots_taken <>"
            " (SELECT count(*) FROM annotate_assignment a WHERE a.comparison_id = c.id"
            "   AND a.status IN ('active', 'done'))",
            [project.id],
        )
        assert cur.fetchone() == (0,)


def test_replay_with_next_returns_the_first_judgment_and_the_leases(
    annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("replay", annotators=(annotator,))
    text_pairs(project, n=3)
    c = client_for(annotator)
    lease = c.get("/api/projects/replay/next/").json()["items"][0]
    payload = {"assignment": lease["assignment"], "choice": "left", "idempotency_key": "abc"}
    first = c.post("/api/projects/replay/judgments/?next=1", payload, format="json")
    second = c.post("/api/projects/replay/judgments/?next=1", payload, format="json")
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()
    assert Judgment.objects.filter(project=project).count() == 1
    assert Assignment.objects.filter(project=project).count() == 2


def _functions(schema: str) -> dict[str, tuple[Any, ...]]:
    with connection.cursor() as cur:
        cur.execute(
            """SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
                      p.prosrc, p.proconfig, l.lanname
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 JOIN pg_language l ON l.oid = p.prolang
                WHERE n.nspname = %s AND p.proname LIKE 'rl\\_%%'""",
            [schema],
        )
        rows = cur.fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_installed_functions_equal_the_source_file() -> None:
    """The migrations installed exactly the functions of annotate/sql/labeling.sql: the source,
    loaded into a scratch schema, gives the same names, signatures, bodies and settings."""
    source = (Path(__file__).parents[2] / "annotate" / "sql" / "labeling.sql").read_text(encoding="utf-8")
    installed = _functions("public")
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("CREATE SCHEMA rl_source_check")
            cur.execute("SET LOCAL search_path = rl_source_check, public")
            cur.execute(source, None)
        from_source = _functions("rl_source_check")
        transaction.set_rollback(True)
    assert sorted(from_source) == [
        "rl_enter",
        "rl_fail",
        "rl_judgment_json",
        "rl_leases",
        "rl_map_choice",
        "rl_next",
        "rl_next_leases",
        "rl_payload",
        "rl_submit",
    ]
    assert sorted(installed) == sorted(from_source)
    for name, definition in from_source.items():
        assert installed[name] == definition, (
            f"{name} differs from annotate/sql/labeling.sql: add a migration"
        )


def test_latest_migration_copy_is_the_source() -> None:
    """Editing the source without a migration that loads a copy of it is caught here too."""
    root = Path(__file__).parents[2] / "annotate"
    copies = sorted((root / "migrations" / "sql").glob("*_labeling.sql"))
    assert copies, "no versioned copy of the labeling functions"
    assert copies[-1].read_text(encoding="utf-8") == (root / "sql" / "labeling.sql").read_text(
        encoding="utf-8"
    )
