"""Bad input at the boundary: every refusal a 4xx in our error shape, and no row changed.

Each case here answered 500 (Django's HTML page) before the parsers, the domain checks in
``annotate.validation`` and the error handlers existed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from annotate import services
from annotate.models import Assignment, DatasetSnapshot, Judgment, Sample
from tests.factories import broker_unreachable, client_for, png_bytes, rows_digest

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _tokens(manager: Any, annotator: Any) -> None:
    """Tokens exist before any digest is taken: clients made in a test do not count as changes."""
    from rest_framework.authtoken.models import Token

    for user in (manager, annotator):
        Token.objects.get_or_create(user=user)


def _refused(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


@pytest.fixture
def leased(manager: Any, annotator: Any, make_project: Any, text_pairs: Any) -> Any:
    project = make_project("bnd", annotators=(annotator,), aspects=[{"key": "style"}])
    text_pairs(project, n=2)
    lease = services.assignment_next(project=project, annotator=annotator)[0]
    return project, lease


NUL = "a\x00b"
SURROGATE_BODY = b'{"assignment": 1, "rationale": "\\ud800"}'


@pytest.mark.parametrize(
    "field,value",
    [
        ("rationale", NUL),
        ("idempotency_key", NUL),
        ("aspects", {"style": NUL}),
        ("aspects", {NUL: "left"}),
        ("artifacts", [{"sample": 1, "note": NUL}]),
        ("artifacts", [{"sample": 2**70}]),
        ("assignment", 2**64),
        ("assignment", "9" * 30),
        ("ranking", ["\u00b2"]),  # "²".isdigit() is True; int("²") raises
        ("artifacts", [{"sample": "\u00b2"}]),
        ("artifacts", [{"sample": "9" * 30}]),
        ("time_spent_ms", -(2**63) - 1),
    ],
)
def test_submit_refuses_unstorable_values(leased: Any, annotator: Any, field: str, value: Any) -> None:
    project, lease = leased
    body = {"assignment": lease.id, "choice": "left", field: value}
    before = rows_digest()
    r = client_for(annotator).post(f"/api/projects/{project.slug}/judgments/", body, format="json")
    error = _refused(r)
    assert error["code"] in ("parse_error", "invalid")
    assert rows_digest() == before
    assert Judgment.objects.count() == 0


def test_lone_surrogate_and_deep_nesting_are_refused(leased: Any, annotator: Any) -> None:
    project, _ = leased
    c: Any = client_for(annotator)
    before = rows_digest()
    r = c.generic("POST", f"/api/projects/{project.slug}/judgments/", SURROGATE_BODY, "application/json")
    assert "surrogate" in _refused(r)["message"]
    deep = b'{"assignment": 1, "aspects": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001
    r = c.generic("POST", f"/api/projects/{project.slug}/judgments/", deep, "application/json")
    _refused(r)
    r = c.generic(
        "POST", f"/api/projects/{project.slug}/judgments/", b'{"assignment": NaN}', "application/json"
    )
    _refused(r)
    assert rows_digest() == before


@pytest.mark.parametrize(
    "body,words",
    [
        ({"slug": "n1", "name": NUL}, "NUL"),
        ({"slug": "n2", "name": "N", "instructions": NUL}, "NUL"),
        ({"slug": "n3", "name": "N", "aspects": [{"key": NUL}]}, "NUL"),
        ({"slug": "n4", "name": "N", "aspects": [{"key": "ok", "label": NUL}]}, "NUL"),
        ({"slug": "n5", "name": "N", "aspects": [{"key": "x" * 300}]}, "limit"),
        ({"slug": "n6", "name": "N", "lease_seconds": 2**31}, "lease_seconds"),
        ({"slug": "n7", "name": "N", "lease_seconds": 2**64}, "integer"),
        ({"slug": "n8", "name": "N", "undo_seconds": 10**30}, "integer"),
        ({"slug": "n9", "name": "N", "aspects": ["not an object"]}, "aspect"),
    ],
)
def test_project_create_refuses_unstorable_values(manager: Any, body: dict[str, Any], words: str) -> None:
    before = rows_digest()
    r = client_for(manager).post("/api/projects/", body, format="json")
    assert words.lower() in _refused(r)["message"].lower()
    assert rows_digest() == before


@pytest.mark.parametrize(
    "item,words",
    [
        ({"prompt": NUL, "text": "t"}, "NUL"),
        ({"prompt": "p", "text": NUL}, "NUL"),
        ({"prompt": "p", "text": "t", "generator": NUL}, "NUL"),
        ({"prompt": "p", "text": "t", "generator": "g", "generator_version": NUL}, "NUL"),
        ({"prompt": "p", "text": "t", "generator": "g" * 201}, "200"),
        ({"prompt": "p", "text": "t", "generator": "g", "generator_version": "v" * 201}, "200"),
        ({"prompt": "p", "text": "t", "metadata": {"k": NUL}}, "NUL"),
        ({"prompt": "p", "text": "t", "metadata": {NUL: 1}}, "NUL"),
        ({"prompt": "p", "text": "t", "metadata": {"big": 2**64}}, "range"),
    ],
)
def test_text_samples_refuse_unstorable_values(
    manager: Any, make_project: Any, item: dict[str, Any], words: str
) -> None:
    make_project("txt")
    good = {"prompt": "p0", "text": "fine"}
    before = rows_digest()
    r = client_for(manager).post("/api/projects/txt/samples/", {"samples": [good, item]}, format="json")
    assert words.lower() in _refused(r)["message"].lower()
    assert rows_digest() == before


def test_media_upload_form_fields_refuse_nul(manager: Any, make_project: Any) -> None:
    make_project("med")
    before = rows_digest()
    for fields in (
        {"prompt": NUL},
        {"prompt": "p", "generator": NUL},
        {"prompt": "p", "metadata": '{"a": "\\u0000"}'},
        {"prompt": "p", "metadata": "[" * 100_000},  # RecursionError in json.loads
    ):
        r = client_for(manager).post(
            "/api/projects/med/samples/",
            {"file": SimpleUploadedFile("a.png", png_bytes(), content_type="image/png"), **fields},
            format="multipart",
        )
        _refused(r)
    assert rows_digest() == before


def test_snapshot_name_and_query_string_refusals(manager: Any, make_project: Any) -> None:
    make_project("snap")
    c: Any = client_for(manager)
    before = rows_digest()
    _refused(c.post("/api/projects/snap/snapshots/", {"name": NUL}, format="json"))
    _refused(c.post("/api/projects/snap/snapshots/", {"name": "n" * 201}, format="json"))
    _refused(c.get("/api/projects/snap/export/?since=%00"))
    _refused(c.get("/api/projects/snap/export/?aspect=a%00b"))
    _refused(c.get("/api/projects/snap/export/?generator_versions=%C2%B2"))  # "²"
    _refused(c.post("/api/projects/snap/snapshots/", {"generator_versions": "\u00b2"}, format="json"))
    assert rows_digest() == before


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _import(c: Any, slug: str, data: bytes) -> Any:
    return c.post(
        f"/api/projects/{slug}/imports/samples/",
        {"file": SimpleUploadedFile("u.zip", data)},
        format="multipart",
    )


def test_zip_with_a_bad_crc_is_refused(manager: Any, make_project: Any) -> None:
    make_project("crc")
    image = png_bytes(size=(64, 64))
    data = bytearray(_zip({"manifest.jsonl": b'{"prompt": "p", "path": "a.png"}\n', "a.png": image}))
    # Flip one byte of the deflated image data: the local header and sizes stay valid, the CRC
    # check on reading fails.
    header = data.index(b"a.png", data.index(b"PK\x03\x04", 10)) + len(b"a.png")
    data[header + 20] ^= 0xFF
    before = rows_digest()
    error = _refused(_import(client_for(manager), "crc", bytes(data)))
    assert error["message"].startswith("row 1: a.png is damaged in the zip")
    assert rows_digest() == before


@pytest.mark.parametrize(
    "manifest,words",
    [
        ('{"prompt": "p\\u0000", "text": "t"}\n', "row 1: prompt: contains a NUL"),
        ('{"prompt": "p", "text": "t\\u0000"}\n', "row 1: text: contains a NUL"),
        (
            '{"prompt": "p", "text": "t"}\n{"prompt": "p", "text": "u", "generator": "\\ud800"}\n',
            "row 2: generator",
        ),
        ('{"prompt": "p", "text": "t", "generator": "' + "g" * 201 + '"}\n', "row 1: generator: 201"),
        ('{"prompt": "p", "text": "t", "metadata": {"a": "\\u0000"}}\n', "row 1: metadata.a"),
        ('{"prompt": "p", "text": "t", "metadata": {"a": 1e999}}\n', "row 1: metadata.a"),
        ('{"prompt": ["p"], "text": "t"}\n', "row 1: 'prompt' must be a string"),
    ],
)
def test_manifest_cells_are_checked_with_the_row_named(
    manager: Any, make_project: Any, manifest: str, words: str
) -> None:
    make_project("man")
    before = rows_digest()
    error = _refused(_import(client_for(manager), "man", _zip({"manifest.jsonl": manifest.encode()})))
    assert error["message"].startswith(words), error
    assert rows_digest() == before


def test_csv_manifest_cells_are_checked(manager: Any, make_project: Any) -> None:
    make_project("csvm")
    before = rows_digest()
    data = _zip({"manifest.csv": b"prompt,text\np,ok\nq,bad\x00cell\n"})
    error = _refused(_import(client_for(manager), "csvm", data))
    assert error["message"].startswith("row 2"), error
    assert rows_digest() == before


def test_manifest_past_65535_rows_imports(manager: Any, make_project: Any) -> None:
    """One dedupe query per batch: a single IN over every row passed PostgreSQL's 65,535-parameter
    limit and failed the whole import. 66,000 rows, most of them already stored (inserted here in
    SQL, so the test is quick), the rest new."""
    project = make_project("big", modality="text")
    prompt = services.prompt_get_or_create(project=project, text="p")
    n, stored = 66_000, 65_700
    with connection.cursor() as cur:
        cur.execute(
            """INSERT INTO annotate_sample (project_id, prompt_id, modality, media, mime_type, text,
                   content_hash, byte_size, metadata, created_at)
               SELECT %s, %s, 'text', '', 'text/markdown', 't' || i,
                      encode(sha256(convert_to('t' || i, 'UTF8')), 'hex'), length('t' || i), '{}', now()
               FROM generate_series(0, %s) AS i""",
            [project.id, prompt.id, stored - 1],
        )
    manifest = "".join(json.dumps({"prompt": "p", "text": f"t{i}"}) + "\n" for i in range(n))
    r = _import(client_for(manager), "big", _zip({"manifest.jsonl": manifest.encode()}))
    assert r.status_code == 201, r.content[:300]
    assert (r.json()["rows"], r.json()["duplicates"], r.json()["created"]) == (n, stored, n - stored)
    assert Sample.objects.filter(project__slug="big").count() == n


def test_zip_import_holds_one_batch_in_memory(manager: Any, make_project: Any) -> None:
    """A zip of highly compressible images: 300 entries of 1 MB each inflate from ~0.3 MB. The
    import holds at most one batch (32 MB) of decompressed media, not the whole upload."""
    import tracemalloc

    make_project("bomb")
    from PIL import Image

    # Uncompressed PNGs: ~1 MB each in the zip entry, deflated by the zip to ~1 KB.
    files = {"manifest.jsonl": b""}
    lines = []
    for i in range(300):
        buf = io.BytesIO()
        img = Image.new("L", (1024, 1024), 0)
        img.putpixel((i % 1024, 0), 255)  # distinct content, still compressible
        img.save(buf, format="PNG", compress_level=0)
        files[f"{i}.png"] = buf.getvalue()
        lines.append(json.dumps({"prompt": "p", "path": f"{i}.png"}))
    files["manifest.jsonl"] = ("\n".join(lines) + "\n").encode()
    data = _zip(files)
    assert len(data) < 1_000_000
    tracemalloc.start()
    r = _import(client_for(manager), "bomb", data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert r.status_code == 201, r.content[:300]
    assert r.json()["created"] == 300
    assert peak < 120 * 1024 * 1024, peak  # 300 MB of media was held before


def test_non_utf8_jsonl_and_bad_parquet_are_refused(manager: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    services.project_create(creator=manager, slug="prefs", name="P", modality="text")
    c: Any = client_for(manager)
    users_before = get_user_model().objects.count()
    before = rows_digest()
    jsonl = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n'
    r = c.post(
        "/api/projects/prefs/imports/preferences/?format=trl",
        {"file": SimpleUploadedFile("p.jsonl", jsonl)},
        format="multipart",
    )
    assert _refused(r)["message"].startswith("row 2: not UTF-8")
    jsonl = b'{"prompt": "p\\u0000", "chosen": "a", "rejected": "b"}\n'
    r = c.post(
        "/api/projects/prefs/imports/preferences/?format=trl",
        {"file": SimpleUploadedFile("p.jsonl", jsonl)},
        format="multipart",
    )
    assert _refused(r)["message"].startswith("row 1: prompt: contains a NUL")
    # Two failed imports leave no import user behind.
    assert get_user_model().objects.count() == users_before

    services.project_create(creator=manager, slug="pics", name="P", modality="image")
    table = pa.table(
        {
            "caption": ["a cat"],
            "jpg_0": [png_bytes((1, 2, 3))],
            "jpg_1": [png_bytes((4, 5, 6))],
            "label_0": ["1"],
            "label_1": ["0"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    before = rows_digest()
    r = c.post(
        "/api/projects/pics/imports/preferences/?format=pickapic",
        {"file": SimpleUploadedFile("p.parquet", buf.getvalue())},
        format="multipart",
    )
    assert _refused(r)["message"] == "row 1: label_0/label_1 must be numbers"
    assert rows_digest() == before


def test_failed_imports_leave_no_import_user(manager: Any) -> None:
    services.project_create(creator=manager, slug="fail", name="F", modality="text")
    c: Any = client_for(manager)
    users_before = get_user_model().objects.count()
    bad = b'{"prompt": "p", "chosen": "same", "rejected": "same"}\n'
    for _ in range(2):
        r = c.post(
            "/api/projects/fail/imports/preferences/?format=trl",
            {"file": SimpleUploadedFile("p.jsonl", bad)},
            format="multipart",
        )
        _refused(r)
    assert get_user_model().objects.count() == users_before
    assert not get_user_model().objects.filter(username__startswith="import-").exists()


@pytest.mark.django_db(transaction=True)  # the build is queued on commit
def test_snapshot_with_the_broker_down_is_a_503_and_leaves_no_row(manager: Any, make_project: Any) -> None:
    make_project("down")
    c: Any = client_for(manager)
    with broker_unreachable():
        before = rows_digest()
        r = c.post("/api/projects/down/snapshots/", {"schema": "raw"}, format="json")
        error = _refused(r, 503)
        assert error["code"] == "unavailable"
        assert r["Retry-After"] == "5"
        assert rows_digest() == before
        assert DatasetSnapshot.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_database_unreachable_is_a_503_with_retry_after(manager: Any) -> None:
    c: Any = client_for(manager)
    c.raise_request_exception = False
    # A token the per-process auth cache has not seen, so the request must reach the database.
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict["HOST"] = "/nonexistent-socket-dir"
    connection.settings_dict["PORT"] = "1"
    try:
        r = c.get("/api/projects/")
        error = _refused(r, 503)
        assert error["code"] == "unavailable" and "database" in error["message"]
        assert r["Retry-After"] == "5"
        # A page outside DRF (the labeling page needs the session, in the database) too.
        page = c.get("/label/x/", HTTP_COOKIE="sessionid=" + "a" * 32)
        assert page.status_code == 503 and page.json()["error"]["code"] == "unavailable"
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
    assert c.get("/api/projects/").status_code == 200


def test_unexpected_errors_answer_our_json_shape(rf: Any) -> None:
    from annotate.api.errors import server_error

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        response = server_error(rf.get("/api/projects/"))
    assert response.status_code == 500
    assert json.loads(response.content) == {
        "error": {
            "code": "server_error",
            "message": "internal server error; it has been logged",
            "details": {},
        }
    }


def test_expired_or_missing_leases_and_huge_ids_are_4xx(leased: Any, annotator: Any) -> None:
    project, lease = leased
    c: Any = client_for(annotator)
    before = rows_digest()
    _refused(c.post(f"/api/projects/{project.slug}/skip/", {"assignment": 2**63}, format="json"))
    r = c.post(
        f"/api/projects/{project.slug}/judgments/", {"assignment": 2**63 - 1, "choice": "left"}, format="json"
    )
    assert r.status_code == 404
    assert rows_digest() == before
    assert Assignment.objects.get(id=lease.id).status == "active"


def test_commands_on_a_fresh_checkout_migrate_the_embedded_database(tmp_path: Path) -> None:
    """`import_preferences` run before `up` on a fresh checkout: the embedded database gets its
    tables, and the command says in one line what it needs (no traceback)."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env["RL_VAR_DIR"] = str(tmp_path / "var")
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')

    def import_preferences() -> subprocess.CompletedProcess[str]:
        command = ["manage.py", "import_preferences", "--format", "trl", "--project", "x", str(data)]
        return subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )

    try:
        run = import_preferences()
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr and "does not exist" not in run.stderr, run.stderr
        assert "applying" in run.stderr and "migration" in run.stderr
        assert run.stderr.strip().splitlines()[-1] == (
            "CommandError: no acting user: create one with `python manage.py createsuperuser`, "
            "or pass --as-user NAME"
        )
        # Now the tables exist: a superuser can be made and the import runs.
        subprocess.run(
            [
                sys.executable,
                "manage.py",
                "shell",
                "-c",
                "from django.contrib.auth.models import User; User.objects.create_superuser('root', '', 'pw')",
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        run = import_preferences()
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("1 rows into x: 1 judgments")
    finally:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from config import embedded; from pathlib import Path; "
                "v = Path(sys.argv[1]); embedded.stop_redis(v); embedded.stop_postgres(v)",
                env["RL_VAR_DIR"],
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=60,
        )
