"""A bulk load keeps VACUUM and ANALYZE off its tables until it commits (annotate/bulk.py):
one that ran mid-load would record the tables as empty (the load's rows are not visible to it)
and the load's foreign-key checks, replanned against that, fell from 80,000 rows/s to 100.
Reads and writes from other sessions (labeling) are not held up."""

from __future__ import annotations

import io
import json
from typing import Any

import psycopg
import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annotate import imports
from annotate.bulk import COPY_NULL, TableCopier, _copy_field, bulk_load_settings, copy_escape
from annotate.imports import pairs_from_rows
from annotate.models import Comparison, ComparisonSample, Judgment, Project, Prompt, Sample

pytestmark = pytest.mark.django_db

TABLES = [
    "annotate_prompt",
    "annotate_sample",
    "annotate_comparison",
    "annotate_comparisonsample",
    "annotate_judgment",
]


def _other_session() -> tuple[psycopg.Connection, list[str]]:
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    conn = psycopg.connect(**params, autocommit=True)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("SET lock_timeout = '5s'")
    return conn, notices


@pytest.mark.django_db(transaction=True)
def test_an_import_keeps_vacuum_off_its_tables_and_lets_labeling_through(
    manager: Any, make_project: Any
) -> None:
    project = make_project("bulk", modality="text")
    other, notices = _other_session()
    seen: list[list[str]] = []

    def progress(done: int) -> None:  # mid-import: the rows so far are written, not committed
        notices.clear()
        for table in TABLES:
            other.execute(f"VACUUM (ANALYZE, SKIP_LOCKED) {table}")  # as autovacuum does
        seen.append(list(notices))
        # A labeling request's reads and writes go through (lock_timeout would raise otherwise).
        other.execute("SELECT count(*) FROM annotate_sample").fetchone()
        other.execute("UPDATE annotate_comparison SET priority = priority WHERE id = -1")

    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(5)]
    with other:
        result = imports.preferences_import(
            project=project,
            actor=manager,
            fmt="trl",
            file=io.BytesIO(pairs_from_rows(rows)),
            progress=progress,
        )
        assert result.comparisons == 5
        assert seen, "progress was not reported"
        for table in TABLES:
            assert any(f'skipping vacuum of "{table}"' in n for n in seen[0]), seen[0]
        notices.clear()
        other.execute("VACUUM (ANALYZE, SKIP_LOCKED) annotate_sample")  # after the commit: it runs
        assert not any("skipping" in n for n in notices), notices


# --- Foreign keys checked set-wise (BulkLoad(batch_foreign_keys=True)) --------------------------
LOADED: list[Any] = [Prompt, Sample, Comparison, ComparisonSample, Judgment]


def _import(project: Project, manager: Any, n: int = 3, **kwargs: Any) -> imports.ImportResult:
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]
    return imports.preferences_import(
        project=project, actor=manager, fmt="trl", file=io.BytesIO(pairs_from_rows(rows)), **kwargs
    )


def _role(cursor: Any) -> str:
    cursor.execute("SHOW session_replication_role")
    return str(cursor.fetchone()[0])


def _clone(cursor: Any, model: Any, row_id: int, changes: dict[str, Any]) -> int:
    """Insert a copy of one row with a new id and some columns changed; returns the new id."""
    table = model._meta.db_table
    cursor.execute(
        f"CREATE TEMP TABLE rl_clone ON COMMIT DROP AS SELECT * FROM {table} WHERE id = %s", [row_id]
    )
    sets = ", ".join(f"{col} = %s" for col in changes)
    cursor.execute(
        f"UPDATE rl_clone SET id = nextval(pg_get_serial_sequence('{table}', 'id')), {sets}",
        list(changes.values()),
    )
    cursor.execute(f"INSERT INTO {table} SELECT * FROM rl_clone RETURNING id")
    new_id = int(cursor.fetchone()[0])
    cursor.execute("DROP TABLE rl_clone")
    return new_id


def test_batched_checks_cover_every_foreign_key_of_the_loaded_tables() -> None:
    with transaction.atomic(), connection.cursor() as cur:
        load = bulk_load_settings(cur.cursor, LOADED, batch_foreign_keys=True)
        assert load.batched, "the test database role may skip per-row checks (superuser)"
        assert _role(cur) == "replica"
        assert sorted((k.child, k.columns, k.parent) for k in load.keys) == [
            ("annotate_comparison", ("prompt_id", "project_id"), "annotate_prompt"),
            ("annotate_comparisonsample", ("comparison_id", "prompt_id"), "annotate_comparison"),
            ("annotate_comparisonsample", ("sample_id", "prompt_id"), "annotate_sample"),
            ("annotate_judgment", ("annotator_id",), "auth_user"),
            ("annotate_judgment", ("assignment_id",), "annotate_assignment"),
            ("annotate_judgment", ("comparison_id",), "annotate_comparison"),
            ("annotate_judgment", ("project_id",), "annotate_project"),
            ("annotate_judgment", ("winner_id",), "annotate_sample"),
            ("annotate_prompt", ("project_id",), "annotate_project"),
            ("annotate_sample", ("generator_version_id",), "annotate_generatorversion"),
            ("annotate_sample", ("prompt_id", "project_id"), "annotate_prompt"),
        ]
        load.finish(cur.cursor)
        assert _role(cur) == "origin"


@pytest.mark.parametrize(
    ("model", "changes", "constraint"),
    [
        (Prompt, {"project_id": 10**12, "text_hash": "f" * 64}, "annotate_prompt_project_id_2b8d49c8_fk_annotate_project_id"),
        (Sample, {"generator_version_id": 10**12, "content_hash": "f" * 64}, "annotate_sample_generator_version_id_400e8f0c_fk_annotate_"),
        (Sample, {"prompt_id": 10**12, "content_hash": "f" * 64}, "sample_prompt_same_project"),
        (Comparison, {"prompt_id": 10**12}, "comparison_prompt_same_project"),
        (ComparisonSample, {"position": 7, "sample_id": "other"}, "compsample_sample_same_prompt"),
        (Judgment, {"annotator_id": 2**31 - 1}, "annotate_judgment_annotator_id_b695945d_fk_auth_user_id"),
        (Judgment, {"annotator_id": "manager", "winner_id": 10**12}, "annotate_judgment_winner_id_36d2b686_fk_annotate_sample_id"),
    ],
)  # fmt: skip
def test_a_row_breaking_a_foreign_key_is_refused_by_the_batch_check_and_nothing_stays(
    manager: Any, make_project: Any, model: Any, changes: dict[str, Any], constraint: str
) -> None:
    project = make_project("fk", modality="text")
    _import(project, manager)
    first = ComparisonSample.objects.filter(comparison__project=project).order_by("id").first()
    assert first is not None
    other = Sample.objects.filter(project=project).exclude(prompt_id=first.prompt_id).first()
    assert other is not None
    values = {
        k: (other.id if v == "other" else manager.id if v == "manager" else v) for k, v in changes.items()
    }
    row_id = {
        Prompt: first.prompt_id,
        Sample: first.sample_id,
        Comparison: first.comparison_id,
        ComparisonSample: first.id,
        Judgment: Judgment.objects.filter(comparison_id=first.comparison_id).values_list("id", flat=True)[0],
    }[model]
    counts = {m: m.objects.count() for m in LOADED}
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic(), connection.cursor() as cur:
        load = bulk_load_settings(cur.cursor, LOADED, batch_foreign_keys=True)
        new_id = _clone(cur, model, row_id, values)  # not refused: per-row checks are off
        load.check_written(cur.cursor, {model._meta.db_table: [new_id]})
    assert {m: m.objects.count() for m in LOADED} == counts
    with connection.cursor() as cur:
        assert _role(cur) == "origin"  # rolled back with the load
        # And per-row, the same row is refused at once.
        with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
            bulk_load_settings(cur.cursor, LOADED)
            _clone(cur, model, row_id, values)


def test_a_role_that_may_not_skip_row_checks_gets_them(manager: Any, make_project: Any) -> None:
    project = make_project("fk", modality="text")
    with connection.cursor() as cur:
        cur.execute("CREATE ROLE rl_bulk_plain NOSUPERUSER")  # undone with the test's transaction
        cur.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO rl_bulk_plain")
        cur.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO rl_bulk_plain")
        cur.execute("SET LOCAL ROLE rl_bulk_plain")
        with transaction.atomic():
            load = bulk_load_settings(cur.cursor, LOADED, batch_foreign_keys=True)
            assert not load.batched
            assert _role(cur) == "origin"
        result = _import(project, manager, n=5)  # as this role: checked row by row, and it works
        assert result.comparisons == 5
        cur.execute("RESET ROLE")
    assert Judgment.objects.filter(project=project).count() == 5


def test_an_import_ends_with_row_checks_on(manager: Any, make_project: Any) -> None:
    project = make_project("fk", modality="text")
    roles: list[str] = []

    def progress(done: int) -> None:
        with connection.cursor() as cur:
            roles.append(_role(cur))

    assert _import(project, manager, n=4, progress=progress).comparisons == 4
    with connection.cursor() as cur:
        assert roles == ["replica"] and _role(cur) == "origin"  # within this test's transaction
    with pytest.raises(IntegrityError, match="violates foreign key constraint"), transaction.atomic():
        Comparison.objects.filter(project=project).update(prompt_id=10**12)


@pytest.mark.django_db(transaction=True)
def test_a_stored_sample_an_import_reuses_cannot_be_deleted_under_it(manager: Any, make_project: Any) -> None:
    """The batch check locks the parents it finds (FOR KEY SHARE), as the per-row checks do: a
    sample stored before the import and referenced by it cannot be deleted until the commit."""
    project = make_project("fk", modality="text")
    _import(project, manager)  # the samples, committed
    reused = Sample.objects.filter(project=project).order_by("id").first()
    assert reused is not None
    other, _ = _other_session()
    errors: list[str] = []

    def progress(done: int) -> None:  # the second import's chunk is written and checked
        try:
            other.execute("DELETE FROM annotate_sample WHERE id = %s", [reused.id])
        except psycopg.errors.LockNotAvailable as exc:
            errors.append(str(exc))

    with other:
        other.execute("SET lock_timeout = '1s'")
        result = _import(project, manager, progress=progress)  # the same rows: samples reused
        assert result.duplicates == 6 and result.comparisons == 3
    assert len(errors) == 1 and "lock timeout" in errors[0]
    assert Sample.objects.filter(id=reused.id).exists()


# Any storable text (no NUL, no lone surrogate), with COPY's special characters made likely.
_copy_text = st.text(
    alphabet=st.one_of(
        st.sampled_from("\\\t\n\r\\N ab"),
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.one_of(st.none(), _copy_text)), max_size=30
    )
)
def test_copy_lines_stores_exactly_the_values_formatted(values: list[tuple[int, str | None]]) -> None:
    """copy_lines' text format (copy_escape, COPY_NULL) against what PostgreSQL reads back."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE rl_copy_probe (i bigint, t text, d timestamptz, j jsonb) ON COMMIT DROP"
        )
        copier = TableCopier.__new__(TableCopier)  # a table with no model: set what copy_lines uses
        copier.sql = "COPY rl_copy_probe (i, t, d, j) FROM STDIN"
        now = timezone.now()
        copier.tail = (now, '{"a": "\\\\ \\t"}')
        copier.tail_text = "".join("\t" + _copy_field(v) for v in copier.tail) + "\n"
        copier.rows, copier.seconds, copier.chunk_rates = 0, 0.0, []
        lines = (f"{i}\t{COPY_NULL if t is None else copy_escape(t)}" for i, t in values)
        assert copier.copy_lines(cur.cursor, lines) == len(values)
        cur.execute("SELECT i, t, d, j FROM rl_copy_probe")
        got = cur.fetchall()
        assert [(i, t) for i, t, _, _ in got] == values
        # Django leaves jsonb as text for JSONField to decode.
        assert [(d, json.loads(j)) for _, _, d, j in got] == [(now, {"a": "\\ \t"})] * len(values)
        transaction.set_rollback(True)
