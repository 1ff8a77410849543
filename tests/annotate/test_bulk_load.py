"""A bulk load keeps VACUUM and ANALYZE off its tables until it commits (annotate/bulk.py):
one that ran mid-load would record the tables as empty (the load's rows are not visible to it)
and the load's foreign-key checks, replanned against that, fell from 80,000 rows/s to 100.
Reads and writes from other sessions (labeling) are not held up."""

from __future__ import annotations

import io
from typing import Any

import psycopg
import pytest
from django.db import connection

from annotate import imports
from annotate.imports import pairs_from_rows

pytestmark = pytest.mark.django_db(transaction=True)

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
