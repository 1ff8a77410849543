"""The labeling API end to end over HTTP (DRF test client), on the real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from annotate import services
from annotate.models import Assignment, Comparison, ComparisonSample, Judgment, Sample
from tests.factories import client_for, mp4_bytes, png_bytes

pytestmark = pytest.mark.django_db


def test_token_auth_and_project_list(manager: Any, make_project: Any) -> None:
    make_project("alpha")
    anon = client_for(manager)
    anon.credentials()
    r = anon.post("/api/auth/token/", {"username": "manager", "password": "pw-manager"}, format="json")
    assert r.status_code == 200
    anon.credentials(HTTP_AUTHORIZATION=f"Token {r.json()['token']}")
    r = anon.get("/api/projects/")
    assert r.status_code == 200
    assert r.json()["projects"] == [
        {"slug": "alpha", "name": "ALPHA", "role": "manager", "modality": "", "mode": "pairwise"}
    ]
    bad = anon.post("/api/auth/token/", {"username": "manager", "password": "nope"}, format="json")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "bad_credentials"


def test_unauthenticated_is_refused(db: None) -> None:
    from rest_framework.test import APIClient

    r = APIClient().get("/api/projects/")
    assert r.status_code in (401, 403)
    assert "error" in r.json()


def test_create_project_needs_permission(annotator: Any, manager: Any) -> None:
    r = client_for(annotator).post("/api/projects/", {"slug": "x", "name": "X"}, format="json")
    assert r.status_code == 403
    r = client_for(manager).post(
        "/api/projects/",
        {
            "slug": "x",
            "name": "X",
            "aspects": [{"key": "alignment"}, {"key": "fidelity", "label": "Fidelity"}],
        },
        format="json",
    )
    assert r.status_code == 201, r.json()
    assert r.json()["aspects"] == [
        {"key": "alignment", "label": "alignment"},
        {"key": "fidelity", "label": "Fidelity"},
    ]
    again = client_for(manager).post("/api/projects/", {"slug": "x", "name": "X"}, format="json")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "slug_taken"


def test_upload_image_video_text(manager: Any, make_project: Any) -> None:
    make_project("media")
    c = client_for(manager)
    r = c.post(
        "/api/projects/media/samples/",
        {
            "file": SimpleUploadedFile("a.png", png_bytes(), content_type="image/png"),
            "prompt": "red",
            "generator": "g",
            "generator_version": "1",
        },
        format="multipart",
    )
    assert r.status_code == 201, r.json()
    img = r.json()["samples"][0]
    assert (img["modality"], img["width"], img["height"], img["mime_type"]) == ("image", 32, 24, "image/png")
    # The same bytes again: deduplicated by content hash, no second row.
    r2 = c.post(
        "/api/projects/media/samples/",
        {"file": SimpleUploadedFile("copy.png", png_bytes()), "prompt": "red"},
        format="multipart",
    )
    assert r2.status_code == 200
    assert r2.json()["samples"][0]["id"] == img["id"]
    assert r2.json()["samples"][0]["created"] is False
    # A video whose name lies: the type is sniffed from the bytes.
    r = c.post(
        "/api/projects/media/samples/",
        {"file": SimpleUploadedFile("clip.bin", mp4_bytes()), "prompt": "red"},
        format="multipart",
    )
    assert r.status_code == 201, r.json()
    vid = r.json()["samples"][0]
    assert vid["modality"] == "video"
    assert vid["mime_type"] == "video/mp4"
    assert vid["duration"] == pytest.approx(1.0, abs=0.1)
    r = c.post(
        "/api/projects/media/samples/",
        {"samples": [{"prompt": "red", "text": "# Hello\n\nworld"}]},
        format="json",
    )
    assert r.status_code == 201
    assert r.json()["samples"][0]["text"] == "# Hello\n\nworld"
    assert Sample.objects.filter(project__slug="media").count() == 3
    # The media is served to members, with ranges.
    got = c.get(img["url"])
    assert got.status_code == 200
    assert got.getvalue() == png_bytes()
    part = c.get(vid["url"], HTTP_RANGE="bytes=0-9")
    assert part.status_code == 206
    assert part["Content-Range"].startswith("bytes 0-9/")
    assert len(part.getvalue()) == 10


def test_bad_uploads_are_refused_and_nothing_is_lost(manager: Any, make_project: Any, settings: Any) -> None:
    make_project("bad")
    c = client_for(manager)
    ok = c.post(
        "/api/projects/bad/samples/",
        {"file": SimpleUploadedFile("a.png", png_bytes()), "prompt": "p"},
        format="multipart",
    )
    assert ok.status_code == 201
    before = list(Sample.objects.values_list("id", "content_hash"))
    truncated = png_bytes(size=(64, 64))[:-30]
    cases = [
        ("truncated.png", truncated, 400, "corrupt or truncated"),
        ("fake.mp4", b"this is a text file, not a video\n" * 10, 400, "unsupported file type"),
        ("empty.png", b"", 400, "empty"),
    ]
    for name, data, code, words in cases:
        r = c.post(
            "/api/projects/bad/samples/",
            {"file": SimpleUploadedFile(name, data), "prompt": "p"},
            format="multipart",
        )
        assert r.status_code == code, (name, r.json())
        assert words in r.json()["error"]["message"], r.json()
        assert name in r.json()["error"]["message"]
    settings.RL_MAX_IMAGE_PIXELS = 1000
    r = c.post(
        "/api/projects/bad/samples/",
        {"file": SimpleUploadedFile("big.png", png_bytes(size=(100, 100))), "prompt": "p"},
        format="multipart",
    )
    assert r.status_code == 413
    assert "pixels" in r.json()["error"]["message"]
    settings.RL_MAX_UPLOAD_BYTES = 100
    r = c.post(
        "/api/projects/bad/samples/",
        {"file": SimpleUploadedFile("a2.png", png_bytes((1, 2, 3))), "prompt": "p"},
        format="multipart",
    )
    assert r.status_code == 413
    assert list(Sample.objects.values_list("id", "content_hash")) == before
    # A bulk text upload with one bad item stores none of them.
    r = c.post(
        "/api/projects/bad/samples/",
        {"samples": [{"prompt": "p", "text": "fine"}, {"prompt": "p", "text": "   "}]},
        format="json",
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("sample 1:")
    assert list(Sample.objects.values_list("id", "content_hash")) == before


def test_decompression_bomb_refused_from_header() -> None:
    """A PNG claiming 30000x30000 pixels is refused without decoding it."""
    import io
    import struct
    import zlib

    from annotate.media import MediaTooLarge, inspect_media

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(MediaTooLarge, match="pixels"):
        inspect_media(io.BytesIO(data))


def test_comparisons_explicit_and_random(manager: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("cmp")
    text_pairs(project, n=2)
    c = client_for(manager)
    # A third sample for prompt 0 allows new random pairs for it only.
    services.sample_create_texts(
        project=project, actor=manager, items=[{"prompt": "prompt 0", "text": "answer C0"}]
    )
    r = c.post("/api/projects/cmp/comparisons/", {"random_pairs_per_prompt": 5, "seed": 1}, format="json")
    assert r.status_code == 201, r.json()
    assert r.json()["created"] == 2  # (A0, C0) and (B0, C0); (A0, B0) and (A1, B1) exist already
    assert Comparison.objects.filter(project=project).count() == 4
    again = c.post("/api/projects/cmp/comparisons/", {"random_pairs_per_prompt": 5}, format="json")
    assert again.status_code == 400
    ids = list(Sample.objects.filter(project=project).order_by("id").values_list("id", "prompt__text"))
    p0 = [sid for sid, text in ids if text == "prompt 0"]
    p1 = [sid for sid, text in ids if text == "prompt 1"]
    r = c.post(
        "/api/projects/cmp/comparisons/", {"comparisons": [{"samples": [p0[0], p1[0]]}]}, format="json"
    )
    assert r.status_code == 400
    assert "share one prompt" in r.json()["error"]["message"]
    r = c.post(
        "/api/projects/cmp/comparisons/", {"comparisons": [{"samples": [p0[0], p0[0]]}]}, format="json"
    )
    assert r.status_code == 400
    r = c.post(
        "/api/projects/cmp/comparisons/", {"comparisons": [{"samples": [p0[0], 10**9]}]}, format="json"
    )
    assert r.status_code == 404
    assert Comparison.objects.filter(project=project).count() == 4


def test_label_cycle_records_display_order(
    manager: Any, annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("cycle", annotators=(annotator,))
    text_pairs(project, n=3)
    c = client_for(annotator)
    r = c.get("/api/projects/cycle/next/?n=2")
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 2
    assert body["options"] == {"tie": True, "both_bad": True}
    first = body["items"][0]
    assert first["prompt"]["text"] == "prompt 0"
    shown = [s["id"] for s in first["samples"]]
    # next again returns the same leases first: no new slots are taken.
    again = c.get("/api/projects/cycle/next/?n=2").json()
    assert [i["assignment"] for i in again["items"]] == [i["assignment"] for i in body["items"]]
    r = c.post(
        "/api/projects/cycle/judgments/?next=2",
        {"assignment": first["assignment"], "choice": "left", "time_spent_ms": 1234, "idempotency_key": "k1"},
        format="json",
    )
    assert r.status_code == 201, r.json()
    j = Judgment.objects.get()
    canonical = list(
        ComparisonSample.objects.filter(comparison_id=first["comparison"])
        .order_by("position")
        .values_list("sample_id", flat=True)
    )
    assert j.displayed_order == shown
    assert j.winner_id == shown[0]
    assert j.outcome == ("a" if shown[0] == canonical[0] else "b")
    assert j.time_spent_ms == 1234
    assert Assignment.objects.get(id=first["assignment"]).status == "done"
    cmp = Comparison.objects.get(id=first["comparison"])
    assert (cmp.status, cmp.judgments_count, cmp.slots_taken) == ("complete", 1, 1)
    # The response carries my next leases: the second one plus a new third one.
    nxt = [i["comparison"] for i in r.json()["next"]["items"]]
    assert len(nxt) == 2
    assert first["comparison"] not in nxt
    progress = c.get("/api/projects/cycle/progress/").json()
    assert progress["me"] == {"judged": 1, "skipped": 0, "active_leases": 2, "available": 0}
    assert progress["project"] == {"comparisons": 3, "complete": 1, "judgments": 1, "stuck": 0}


def test_idempotency_key_returns_first_result(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("idem", annotators=(annotator,))
    text_pairs(project, n=2)
    c = client_for(annotator)
    a = c.get("/api/projects/idem/next/").json()["items"][0]["assignment"]
    payload = {"assignment": a, "choice": "right", "idempotency_key": "same-key"}
    r1 = c.post("/api/projects/idem/judgments/", payload, format="json")
    r2 = c.post("/api/projects/idem/judgments/", {**payload, "choice": "left"}, format="json")
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["judgment"] == r2.json()["judgment"]
    assert Judgment.objects.count() == 1
    # A new key on a judged lease is a conflict, not a second row.
    r3 = c.post("/api/projects/idem/judgments/", {**payload, "idempotency_key": "other"}, format="json")
    assert r3.status_code == 409
    assert r3.json()["error"]["code"] == "already_judged"
    # Reusing the key for another lease is refused.
    b = c.get("/api/projects/idem/next/").json()["items"][0]["assignment"]
    r4 = c.post("/api/projects/idem/judgments/", {**payload, "assignment": b}, format="json")
    assert r4.status_code == 409
    assert r4.json()["error"]["code"] == "idempotency_key_reused"
    assert Judgment.objects.count() == 1


def test_judging_a_lease_that_is_not_mine(
    make_user: Any, annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    other = make_user("other")
    outsider = make_user("outsider")
    project = make_project("mine", annotators=(annotator, other))
    text_pairs(project, n=2)
    lease = client_for(annotator).get("/api/projects/mine/next/").json()["items"][0]
    r = client_for(other).post(
        "/api/projects/mine/judgments/", {"assignment": lease["assignment"], "choice": "left"}, format="json"
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "not_your_lease"
    r = client_for(outsider).post(
        "/api/projects/mine/judgments/", {"assignment": lease["assignment"], "choice": "left"}, format="json"
    )
    assert r.status_code == 404
    r = client_for(annotator).post(
        "/api/projects/mine/judgments/", {"assignment": 10**9, "choice": "left"}, format="json"
    )
    assert r.status_code == 404
    assert Judgment.objects.count() == 0
    assert Assignment.objects.get(id=lease["assignment"]).status == "active"


def test_other_projects_are_invisible(
    make_user: Any, annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    a = make_project("proj-a", annotators=(annotator,))
    b = make_project("proj-b")
    text_pairs(a, n=1)
    text_pairs(b, n=1)
    c = client_for(annotator)
    assert c.get("/api/projects/proj-b/next/").status_code == 404
    assert c.get("/api/projects/proj-b/progress/").status_code == 404
    lease = c.get("/api/projects/proj-a/next/").json()["items"][0]
    # A lease of project A submitted through project B's URL is not found there.
    r = c.post(
        "/api/projects/proj-b/judgments/",
        {"assignment": lease["assignment"], "choice": "left"},
        format="json",
    )
    assert r.status_code == 404
    media_sample = Sample.objects.filter(project=b).first()
    assert media_sample is not None
    assert Judgment.objects.count() == 0
    # Annotators cannot add samples or comparisons.
    r = c.post("/api/projects/proj-a/samples/", {"samples": [{"prompt": "p", "text": "t"}]}, format="json")
    assert r.status_code == 403
    r = c.post("/api/projects/proj-a/comparisons/", {"random_pairs_per_prompt": 1}, format="json")
    assert r.status_code == 403


def test_disabled_options_and_bad_choices(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("opts", annotators=(annotator,), allow_tie=False, aspects=[{"key": "alignment"}])
    text_pairs(project, n=1)
    c = client_for(annotator)
    lease = c.get("/api/projects/opts/next/").json()["items"][0]["assignment"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"choice": "tie"}, "does not allow ties"),
        ({"choice": "middle"}, "choice"),
        ({"choice": "left", "aspects": {"color": "left"}}, "unknown aspects"),
        ({"ranking": [1, 2]}, "pairwise"),
    ]
    for extra, words in cases:
        r = c.post("/api/projects/opts/judgments/", {"assignment": lease, **extra}, format="json")
        assert r.status_code == 400, extra
        assert words in r.json()["error"]["message"], r.json()
    r = c.post(
        "/api/projects/opts/judgments/",
        {"assignment": lease, "choice": "both_bad", "aspects": {"alignment": "right"}},
        format="json",
    )
    assert r.status_code == 201
    j = Judgment.objects.get()
    assert j.outcome == "both_bad"
    assert j.winner_id is None
    shown = j.displayed_order
    canonical = list(
        ComparisonSample.objects.filter(comparison=j.comparison)
        .order_by("position")
        .values_list("sample_id", flat=True)
    )
    assert j.aspects == {"alignment": "a" if shown[1] == canonical[0] else "b"}


def test_skip_and_never_again(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("skip", annotators=(annotator,))
    (only,) = text_pairs(project, n=1)
    c = client_for(annotator)
    lease = c.get("/api/projects/skip/next/").json()["items"][0]
    r = c.post("/api/projects/skip/skip/", {"assignment": lease["assignment"]}, format="json")
    assert r.status_code == 200
    assert Comparison.objects.get(id=only).slots_taken == 0
    assert c.get("/api/projects/skip/next/").json()["items"] == []
    r = c.post(
        "/api/projects/skip/judgments/", {"assignment": lease["assignment"], "choice": "left"}, format="json"
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "lease_released"


def test_undo_within_grace_period(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("undo", annotators=(annotator,), undo_seconds=30)
    text_pairs(project, n=2)
    c = client_for(annotator)
    assert c.post("/api/projects/undo/undo/", {}, format="json").status_code == 404
    lease = c.get("/api/projects/undo/next/").json()["items"][0]
    c.post(
        "/api/projects/undo/judgments/", {"assignment": lease["assignment"], "choice": "left"}, format="json"
    )
    r = c.post("/api/projects/undo/undo/", {}, format="json")
    assert r.status_code == 200
    back = r.json()["items"][0]
    assert back["assignment"] == lease["assignment"]
    assert [s["id"] for s in back["samples"]] == [s["id"] for s in lease["samples"]]
    assert Judgment.objects.count() == 0
    cmp = Comparison.objects.get(id=lease["comparison"])
    assert (cmp.status, cmp.judgments_count, cmp.slots_taken) == ("open", 0, 1)
    r = c.post(
        "/api/projects/undo/judgments/", {"assignment": lease["assignment"], "choice": "right"}, format="json"
    )
    assert r.status_code == 201
    Judgment.objects.update(created_at=timezone.now() - timedelta(seconds=31))
    r = c.post("/api/projects/undo/undo/", {}, format="json")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "undo_window_passed"
    assert Judgment.objects.count() == 1


def test_overlap_and_lease_expiry(make_user: Any, make_project: Any, text_pairs: Any) -> None:
    users = [make_user(f"ann{i}") for i in range(3)]
    project = make_project("overlap", annotators=tuple(users), overlap=2, lease_seconds=60)
    (cid,) = text_pairs(project, n=1)
    got = [client_for(u).get("/api/projects/overlap/next/").json()["items"] for u in users]
    assert [len(g) for g in got] == [1, 1, 0]  # two slots only
    # The first lease expires: its slot goes back to the pool, and to the third annotator.
    Assignment.objects.filter(annotator=users[0]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert services.leases_expire() == 1
    assert Comparison.objects.get(id=cid).slots_taken == 1
    third = client_for(users[2]).get("/api/projects/overlap/next/").json()["items"]
    assert [i["comparison"] for i in third] == [cid]
    # The expired lease cannot be judged; the annotator is never served it again.
    r = client_for(users[0]).post(
        "/api/projects/overlap/judgments/",
        {"assignment": got[0][0]["assignment"], "choice": "left"},
        format="json",
    )
    assert r.status_code == 409
    assert client_for(users[0]).get("/api/projects/overlap/next/").json()["items"] == []


def test_paused_annotator_gets_no_new_work(
    manager: Any, annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    project = make_project("pause", annotators=(annotator,))
    text_pairs(project, n=1)
    r = client_for(manager).post(
        "/api/projects/pause/members/",
        {"username": "annotator", "role": "annotator", "paused": True},
        format="json",
    )
    assert r.status_code == 200
    assert client_for(annotator).get("/api/projects/pause/next/").json()["items"] == []
    r = client_for(annotator).post(
        "/api/projects/pause/members/", {"username": "annotator", "role": "manager"}, format="json"
    )
    assert r.status_code == 403


def test_ranking_project(manager: Any, annotator: Any, make_project: Any) -> None:
    project = make_project("rank", annotators=(annotator,), mode="ranking", k=3)
    res = services.sample_create_texts(
        project=project, actor=manager, items=[{"prompt": "p", "text": f"t{i}"} for i in range(3)]
    )
    ids = [r.sample.id for r in res]
    services.comparisons_create(project=project, actor=manager, specs=[{"samples": ids}])
    c = client_for(annotator)
    lease = c.get("/api/projects/rank/next/").json()["items"][0]
    assert len(lease["samples"]) == 3
    bad = c.post(
        "/api/projects/rank/judgments/",
        {"assignment": lease["assignment"], "ranking": ids[:2]},
        format="json",
    )
    assert bad.status_code == 400
    order = [ids[2], ids[0], ids[1]]
    r = c.post(
        "/api/projects/rank/judgments/", {"assignment": lease["assignment"], "ranking": order}, format="json"
    )
    assert r.status_code == 201
    j = Judgment.objects.get()
    assert (j.outcome, j.ranking, j.winner_id) == ("ranking", order, ids[2])


def test_openapi_schema_and_docs(manager: Any) -> None:
    c = client_for(manager)
    r = c.get("/api/schema/")
    assert r.status_code == 200
    assert b"/api/projects/{slug}/next/" in r.content
    c.force_login(manager)
    assert c.get("/api/docs/").status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "assignment"),
        ({"assignment": "abc"}, "assignment"),
        ({"assignment": True}, "assignment"),
        ({"choice": "middle"}, "choice"),
        ({"ranking": "1,2"}, "ranking"),
        ({"ranking": [1, "x"]}, "ranking"),
        ({"aspects": ["a"]}, "aspects"),
        ({"aspects": {"x": {"y": 1}}}, "aspects"),
        ({"artifacts": {"sample": 1}}, "artifacts"),
        ({"artifacts": ["blur"]}, "artifacts"),
        ({"time_spent_ms": -1}, "time_spent_ms"),
        ({"time_spent_ms": 86_400_001}, "time_spent_ms"),
        ({"rationale": "x" * 10_001}, "rationale"),
        ({"rationale": {"a": 1}}, "rationale"),
        ({"idempotency_key": "k" * 65}, "idempotency_key"),
        ({"source": "import"}, "source"),
    ],
)
def test_submit_body_is_validated_field_by_field(
    annotator: Any, make_project: Any, text_pairs: Any, body: dict[str, Any], field: str
) -> None:
    project = make_project("val", annotators=(annotator,))
    text_pairs(project, n=1)
    c = client_for(annotator)
    lease = c.get("/api/projects/val/next/").json()["items"][0]
    payload = {"assignment": lease["assignment"], "choice": "left", **body}
    if body == {}:
        payload = {"choice": "left"}
    r = c.post("/api/projects/val/judgments/", payload, format="json")
    assert r.status_code == 400, r.content
    err = r.json()["error"]
    assert err["code"] == "invalid" and field in err["details"]["fields"]
    assert err["message"].startswith(f"{field}: ")
    assert Judgment.objects.count() == 0
    assert Assignment.objects.get(id=lease["assignment"]).status == "active"


def test_submit_accepts_what_the_serializer_accepted(
    annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    """Numeric strings and surrounding spaces are normalised as DRF fields did."""
    project = make_project("norm", annotators=(annotator,))
    text_pairs(project, n=1)
    c = client_for(annotator)
    lease = c.get("/api/projects/norm/next/").json()["items"][0]
    r = c.post(
        "/api/projects/norm/judgments/",
        {
            "assignment": str(lease["assignment"]),
            "choice": "tie",
            "time_spent_ms": "1200",
            "rationale": "  close call  ",
            "idempotency_key": " k1 ",
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    j = Judgment.objects.get()
    assert (j.outcome, j.time_spent_ms, j.rationale, j.idempotency_key, j.source) == (
        "tie",
        1200,
        "close call",
        "k1",
        "api",  # a token client records its own kind, whatever the body says
    )
