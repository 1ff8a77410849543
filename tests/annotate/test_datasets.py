"""Preference datasets in and out: export schemas, aggregation, filters, streaming API, snapshots,
imports (samples and preferences), all-or-nothing on bad input, and the round trip."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from annotate import exports, imports, services
from annotate.errors import Invalid
from annotate.models import Comparison, DatasetSnapshot, Judgment, Prompt, Sample
from tests.factories import client_for, png_bytes

pytestmark = pytest.mark.django_db


def _judge(project: Any, users: list[Any], choices: list[str]) -> None:
    """Each user takes the next lease and picks the canonical sample named by `choices` (a/b/tie)."""
    for user, choice in zip(users, choices, strict=True):
        (lease,) = services.assignment_next(project=project, annotator=user)
        canonical = list(
            Comparison.objects.get(id=lease.comparison_id).entries.values_list("sample_id", flat=True)
        )
        if choice in ("a", "b"):
            target = canonical[0] if choice == "a" else canonical[1]
            side = "left" if lease.display_order[0] == target else "right"
        else:
            side = choice
        services.judgment_submit(project=project, annotator=user, assignment_id=lease.id, choice=side)


def _rows(project: Any, **kw: Any) -> list[dict[str, Any]]:
    return list(exports.iter_rows(project=project, spec=exports.ExportSpec(**kw)))


@pytest.fixture
def voted(make_user: Any, make_project: Any, text_pairs: Any) -> Any:
    """Comparison 1: votes a, a, b. Comparison 2: votes b, tie, tie."""
    users = [make_user(f"v{i}") for i in range(3)]
    project = make_project("votes", annotators=tuple(users), overlap=3, aspects=[{"key": "alignment"}])
    text_pairs(project, n=2)
    _judge(project, users, ["a", "a", "b"])
    _judge(project, users, ["b", "tie", "tie"])
    project.users = users
    return project


def test_trl_majority_and_agreement(voted: Any) -> None:
    rows = _rows(voted, schema="trl")
    assert rows == [
        {"prompt": "prompt 0", "chosen": "answer A0", "rejected": "answer B0"}
    ]  # comparison 2: tie
    raw = _rows(voted, schema="trl", aggregate="none")
    assert [(r["chosen"], r["rejected"]) for r in raw] == [
        ("answer A0", "answer B0"),
        ("answer A0", "answer B0"),
        ("answer B0", "answer A0"),
        ("answer B1", "answer A1"),
    ]


def test_pickapic_soft_and_majority_labels(voted: Any) -> None:
    soft = _rows(voted, schema="pickapic", aggregate="soft")
    assert [(r["label_0"], r["label_1"]) for r in soft] == [
        pytest.approx((2 / 3, 1 / 3)),
        pytest.approx((1 / 3, 2 / 3)),  # b, tie, tie: ties count half to each side
    ]
    assert [r["agreement"] for r in soft] == [pytest.approx(2 / 3), pytest.approx(2 / 3)]
    assert [r["num_votes"] for r in soft] == [3, 3]
    assert soft[0]["model_0"] == "g@a"
    assert soft[0]["model_1"] == "g@b"
    majority = _rows(voted, schema="pickapic")
    assert [(r["label_0"], r["label_1"]) for r in majority] == [(1.0, 0.0), (0.5, 0.5)]
    per_user = _rows(voted, schema="pickapic", aggregate="none")
    assert len(per_user) == 6
    assert {r["user_id"] for r in per_user} == {u.id for u in voted.users}


def test_min_agreement_gold_paused_and_date_filters(voted: Any, manager: Any) -> None:
    assert len(_rows(voted, schema="raw")) == 6
    assert _rows(voted, schema="pickapic", min_agreement=0.7) == []
    Comparison.objects.filter(project=voted, prompt__text="prompt 0").update(
        is_gold=True, gold_answer={"outcome": "a"}
    )
    assert [r["caption"] for r in _rows(voted, schema="pickapic", gold="only")] == ["prompt 0"]
    assert [r["caption"] for r in _rows(voted, schema="pickapic", gold="exclude")] == ["prompt 1"]
    services.project_member_set(
        project=voted, actor=manager, user=voted.users[0], role="annotator", paused=True
    )
    assert len(_rows(voted, schema="raw", exclude_paused=True)) == 4
    later = timezone.now() + timedelta(minutes=1)
    assert _rows(voted, schema="raw", since=later) == []
    assert len(_rows(voted, schema="raw", until=later)) == 6


def test_generator_version_filter_and_ranking(voted: Any) -> None:
    a_version = Sample.objects.filter(project=voted, text="answer A0").values_list(
        "generator_version_id", flat=True
    )[0]
    assert _rows(voted, schema="raw", generator_versions=(a_version,)) == []
    ranking = _rows(voted, schema="ranking")
    assert ranking[0]["ranking"] == ranking[0]["sample_ids"]  # A0 (2 wins) ranked over B0 (1)
    assert ranking[1]["num_votes"] == 3


def test_aspects_schema(make_user: Any, make_project: Any, text_pairs: Any) -> None:
    user = make_user("asp")
    project = make_project("asp", annotators=(user,), aspects=[{"key": "alignment"}, {"key": "fidelity"}])
    text_pairs(project, n=1)
    (lease,) = services.assignment_next(project=project, annotator=user)
    services.judgment_submit(
        project=project,
        annotator=user,
        assignment_id=lease.id,
        choice="tie",
        aspects={"alignment": "left", "fidelity": "tie"},
    )
    (row,) = _rows(project, schema="aspects")
    first = Comparison.objects.get(id=lease.comparison_id).entries.first()
    assert first is not None
    left_is_a = lease.display_order[0] == first.sample_id
    assert row["overall"] == "same"
    assert row["alignment"] == ("A" if left_is_a else "B")
    assert row["fidelity"] == "same"
    with pytest.raises(Invalid):
        exports.validate_for_project(project=project, spec=exports.ExportSpec(schema="trl", aspect="color"))


def test_export_api_streams_all_formats(voted: Any, manager: Any) -> None:
    c = client_for(manager)
    r = c.get("/api/projects/votes/export/?schema=raw&format=jsonl")
    assert r.status_code == 200
    assert r["Content-Type"] == "application/x-ndjson"
    lines = r.getvalue().decode().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    assert {"annotator", "displayed_order", "time_spent_ms", "aspects", "artifacts", "rationale"} <= set(
        first
    )
    r = c.get("/api/projects/votes/export/?schema=raw&format=parquet")
    table = pq.read_table(io.BytesIO(r.getvalue()))
    assert table.num_rows == 6
    assert table.schema.field("time_spent_ms").type == pa.int64()
    # Pick-a-Pic rows hold images: a text project is refused, not exported as jpg_0 = markdown.
    r = c.get("/api/projects/votes/export/?schema=pickapic&format=parquet&aggregate=soft")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "pickapic_images_only"
    r = c.get("/api/projects/votes/export/?schema=trl&format=csv")
    text = r.getvalue().decode()
    assert text.splitlines() == ["prompt,chosen,rejected", "prompt 0,answer A0,answer B0"]
    bad = c.get("/api/projects/votes/export/?schema=nope")
    assert bad.status_code == 400
    assert "schema must be one of" in bad.json()["error"]["message"]
    assert client_for(voted.users[0]).get("/api/projects/votes/export/").status_code == 403


def test_image_export_with_embedded_bytes(manager: Any, make_user: Any, make_project: Any) -> None:
    user = make_user("img")
    project = make_project("imgs", annotators=(user,))
    ids = [
        services.sample_create_media(
            project=project, actor=manager, file=io.BytesIO(png_bytes(color)), filename="x.png", prompt="red"
        ).sample.id
        for color in [(250, 0, 0), (90, 0, 0)]
    ]
    services.comparisons_create(project=project, actor=manager, specs=[{"samples": ids}])
    _judge(project, [user], ["a"])
    (row,) = _rows(project, schema="trl", media="bytes")
    assert row["chosen"] == png_bytes((250, 0, 0))
    (url_row,) = _rows(project, schema="pickapic", base_url="http://host")
    assert url_row["jpg_0"].startswith(f"http://host/media/samples/{ids[0]}?v=")
    spec = exports.ExportSpec(schema="trl", base_url="http://host")
    (fast,) = [json.loads(line) for line in b"".join(exports.stream(project=project, spec=spec)).splitlines()]
    assert fast == next(exports.iter_rows(project=project, spec=spec))
    assert (
        fast["chosen"]
        == f"http://host/media/samples/{ids[0]}?v={Sample.objects.get(id=ids[0]).content_hash[:12]}"
    )


def test_snapshot_is_built_on_celery_and_content_hashed(
    voted: Any, manager: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from config.celery import app

    app.conf.task_always_eager = True
    try:
        c = client_for(manager)
        with django_capture_on_commit_callbacks(execute=True):
            r = c.post(
                "/api/projects/votes/snapshots/",
                {"schema": "raw", "format": "jsonl", "name": "v1"},
                format="json",
            )
        assert r.status_code == 202, r.json()
        snap_id = r.json()["id"]
    finally:
        app.conf.task_always_eager = False
    detail = c.get(f"/api/projects/votes/snapshots/{snap_id}/").json()
    assert detail["status"] == "done"
    assert detail["row_count"] == 6
    assert detail["rows_expected"] == 6
    body = c.get(detail["download"]).getvalue()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == detail["sha256"]
    assert len(body.decode().splitlines()) == 6
    # Rebuilding is a no-op: a snapshot never changes.
    snap = services.snapshot_build(snapshot_id=snap_id)
    assert snap.sha256 == detail["sha256"]
    assert DatasetSnapshot.objects.count() == 1


# --- Imports -------------------------------------------------------------------------------------
def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_import_samples_zip(manager: Any, make_project: Any) -> None:
    make_project("zip")
    manifest = "\n".join(
        json.dumps(r)
        for r in [
            {"prompt": "red", "path": "img/a.png", "generator": "sd", "generator_version": "1.5"},
            {"prompt": "red", "path": "img/b.png", "generator": "sd", "generator_version": "2.1"},
            {"prompt": "red", "path": "img/a_copy.png"},
            {"prompt": "say hi", "text": "hello"},
        ]
    )
    data = _zip(
        {
            "manifest.jsonl": manifest.encode(),
            "img/a.png": png_bytes((1, 1, 1)),
            "img/b.png": png_bytes((2, 2, 2)),
            "img/a_copy.png": png_bytes((1, 1, 1)),
        }
    )
    r = client_for(manager).post(
        "/api/projects/zip/imports/samples/", {"file": SimpleUploadedFile("up.zip", data)}, format="multipart"
    )
    assert r.status_code == 201, r.json()
    assert (r.json()["rows"], r.json()["created"], r.json()["duplicates"]) == (4, 3, 1)
    assert sorted(Sample.objects.filter(project__slug="zip").values_list("modality", flat=True)) == [
        "image",
        "image",
        "text",
    ]


@pytest.mark.parametrize(
    ("manifest", "files", "words"),
    [
        (
            '{"prompt": "p", "path": "../etc/passwd"}',
            {},
            "row 1: path '../etc/passwd' points outside the upload",
        ),
        (
            '{"prompt": "p", "path": "a.png"}\n{"path": "a.png"}',
            {"a.png": b"x"},
            "row 1: a.png: unsupported file type",
        ),
        (
            '{"prompt": "p", "path": "a.png"}\n{"path": "b.png"}',
            {"a.png": "PNG"},
            "row 2: missing column 'prompt'",
        ),
        ('{"prompt": "p", "path": "missing.png"}', {}, "row 1: 'missing.png' is not in the upload"),
        (
            '{"prompt": "p", "path": "t.png"}',
            {"t.png": "TRUNC"},
            "row 1: t.png: image data is corrupt or truncated",
        ),
    ],
)
def test_bad_sample_imports_store_nothing(
    manager: Any, make_project: Any, manifest: str, files: dict[str, Any], words: str
) -> None:
    make_project("badzip")
    content = {
        k: (png_bytes() if v == "PNG" else png_bytes(size=(64, 64))[:-40] if v == "TRUNC" else v)
        for k, v in files.items()
    }
    data = _zip({"manifest.jsonl": manifest.encode(), **content})
    r = client_for(manager).post(
        "/api/projects/badzip/imports/samples/",
        {"file": SimpleUploadedFile("up.zip", data)},
        format="multipart",
    )
    assert r.status_code == 400, r.json()
    assert words in r.json()["error"]["message"]
    assert Sample.objects.count() == 0
    assert Prompt.objects.count() == 0


def test_import_samples_cli_from_folder(manager: Any, make_project: Any, tmp_path: Any) -> None:
    from django.core.management import call_command

    make_project("folder")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.png").write_bytes(png_bytes((9, 9, 9)))
    (tmp_path / "m" / "manifest.csv").write_text("prompt,path,generator\nred,a.png,sd\nblue,,\n")
    with pytest.raises(Exception, match="row 2: needs a 'path'"):
        call_command("import_samples", str(tmp_path / "m"), project="folder", as_user="manager")
    assert Sample.objects.count() == 0
    (tmp_path / "m" / "manifest.csv").write_text("prompt,path,generator\nred,a.png,sd\n")
    out = io.StringIO()
    call_command("import_samples", str(tmp_path / "m"), project="folder", as_user="manager", stdout=out)
    assert "1 samples created" in out.getvalue()


def test_trl_import_explicit_and_implicit_prompt(manager: Any) -> None:
    project = imports.project_for_import(slug="trl-in", actor=manager, fmt="trl")
    data = imports.pairs_from_rows(
        [
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
            {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},
            {
                "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
            },
        ]
    )
    result = imports.preferences_import(project=project, actor=manager, fmt="trl", file=io.BytesIO(data))
    assert (result.rows, result.judgments, result.created) == (3, 3, 6)
    rows = _rows(project, schema="trl")
    assert rows == [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Q: 2+2? A: ", "chosen": "4", "rejected": "5"},
        {"prompt": "**user:** Hi", "chosen": "Hello!", "rejected": "Go away."},
    ]
    assert set(Judgment.objects.values_list("source", flat=True)) == {"import"}
    assert Comparison.objects.filter(project=project, status="complete", origin="import").count() == 3


def test_trl_round_trip(manager: Any, voted: Any) -> None:
    first = b"".join(exports.stream(project=voted, spec=exports.ExportSpec(schema="trl", aggregate="none")))
    target = imports.project_for_import(slug="round-trip", actor=manager, fmt="trl")
    imports.preferences_import(project=target, actor=manager, fmt="trl", file=io.BytesIO(first))
    again = b"".join(exports.stream(project=target, spec=exports.ExportSpec(schema="trl", aggregate="none")))
    assert again == first


def test_pickapic_parquet_import(manager: Any) -> None:
    table = pa.table(
        {
            "caption": ["a red fox", "a blue car"],
            "jpg_0": [png_bytes((200, 0, 0)), png_bytes((0, 0, 200))],
            "jpg_1": [png_bytes((100, 0, 0)), png_bytes((0, 0, 100))],
            "label_0": [1.0, 0.5],
            "label_1": [0.0, 0.5],
            "model_0": ["sdxl@1.0", "sdxl@1.0"],
            "model_1": ["sd@1.5", "sd@1.5"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    project = imports.project_for_import(slug="pap", actor=manager, fmt="pickapic")
    r = client_for(manager).post(
        "/api/projects/pap/imports/preferences/?format=pickapic",
        {"file": SimpleUploadedFile("p.parquet", buf.getvalue())},
        format="multipart",
    )
    assert r.status_code == 201, r.json()
    assert r.json()["judgments"] == 2
    assert sorted(Judgment.objects.filter(project=project).values_list("outcome", flat=True)) == ["a", "tie"]
    out = _rows(project, schema="pickapic", media="bytes")
    assert [(r["label_0"], r["label_1"], r["model_0"]) for r in out] == [
        (1.0, 0.0, "sdxl@1.0"),
        (0.5, 0.5, "sdxl@1.0"),
    ]
    assert out[0]["jpg_0"] == png_bytes((200, 0, 0))


def test_bad_preference_files_are_refused_whole(manager: Any) -> None:
    project = imports.project_for_import(slug="bad-pref", actor=manager, fmt="trl")
    c = client_for(manager)
    not_parquet = c.post(
        "/api/projects/bad-pref/imports/preferences/?format=pickapic",
        {"file": SimpleUploadedFile("x.parquet", b"hello, not parquet")},
        format="multipart",
    )
    assert not_parquet.status_code == 400
    bad_rows = (
        imports.pairs_from_rows([{"prompt": "p", "chosen": "x", "rejected": "y"}])
        + b'{"prompt": "p", "chosen": "x"}\n'
    )
    r = c.post(
        "/api/projects/bad-pref/imports/preferences/?format=trl",
        {"file": SimpleUploadedFile("x.jsonl", bad_rows)},
        format="multipart",
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "row 2: missing column(s) rejected"
    assert Judgment.objects.filter(project=project).count() == 0
    assert Sample.objects.filter(project=project).count() == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"aggregate": "none"},
        {"aggregate": "majority"},
        {"aggregate": "majority", "min_agreement": 0.7},
        {"aggregate": "none", "exclude_paused": True},
        {"aggregate": "majority", "gold": "exclude", "base_url": "http://h"},
    ],
)
def test_sql_fast_path_gives_the_rows_of_the_general_path(
    voted: Any, manager: Any, kw: dict[str, Any]
) -> None:
    """TRL JSONL is built by PostgreSQL; the Python path (used by every other format) must agree."""
    # With the third annotator paused, exclude_paused leaves comparison 2 a 1-1 b/tie draw (a tie).
    services.project_member_set(
        project=voted, actor=manager, user=voted.users[2], role="annotator", paused=True
    )
    spec = exports.ExportSpec(schema="trl", format="jsonl", **kw)
    assert exports._fast_trl_sql(voted, spec) is not None
    fast = [json.loads(line) for line in b"".join(exports.stream(project=voted, spec=spec)).splitlines()]
    general = list(exports.iter_rows(project=voted, spec=spec))
    assert fast == general
    rows, _digest, _size = exports.write(project=voted, spec=spec, out=io.BytesIO())
    assert rows == len(general)
