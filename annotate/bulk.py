"""Set-based writes: COPY rows into a model's table, with ids taken from its own sequence first so
rows can reference each other before they are inserted. Used by the preference import and the load
benchmark's seeding; the caller validates every value before it gets here."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any


def _copy_text(value: Any) -> Any:
    """A default's database value as COPY takes it, dumped once for every row: a JSON default
    comes as psycopg's Json wrapper, which would be serialised again for each row."""
    obj = getattr(value, "obj", None)
    dumps = getattr(value, "dumps", None)
    if callable(dumps) and obj is not None:
        return dumps(obj)
    return value


class TableCopier:
    """COPY rows into one model's table: the caller gives the columns it varies (by attname, in
    order); every other column gets the model field's own default, so a new field with a default
    needs no change here. A new required field without one fails loudly, naming it."""

    def __init__(self, model: Any, given: list[str], *, now: datetime) -> None:
        from django.db import connection

        by_attname = {f.attname: f for f in model._meta.concrete_fields}
        unknown = [a for a in given if a not in by_attname]
        if unknown:
            raise RuntimeError(f"{model.__name__} has no columns {unknown}")
        extra = []
        for f in model._meta.concrete_fields:
            if f.attname in given:
                continue
            if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
                value = now
            elif f.has_default():
                value = f.get_db_prep_save(f.get_default(), connection)
            elif f.null:
                value = None
            else:
                raise RuntimeError(
                    f"{model.__name__}.{f.name} is required and has no default: pass it in `given`"
                )
            extra.append((f.column, _copy_text(value)))
        quote = connection.ops.quote_name
        columns = [quote(by_attname[a].column) for a in given] + [quote(c) for c, _ in extra]
        self.table = model._meta.db_table
        self.sql = f"COPY {quote(self.table)} ({', '.join(columns)}) FROM STDIN"
        self.tail = tuple(v for _, v in extra)
        self.rows = 0
        self.seconds = 0.0  # inside COPY (the server's work: parsing, indexes, foreign-key checks)
        self.chunk_rates: list[float] = []  # rows/s of each COPY, in order

    def copy(self, cursor: Any, rows: Iterable[tuple[Any, ...]]) -> int:
        """COPY the rows; returns how many. Pass a generator to build rows while the server
        takes in the ones before: built first as a list, the server waits for the whole chunk."""
        tail = self.tail
        n = 0
        t0 = time.perf_counter()
        with cursor.copy(self.sql) as cp:
            write = cp.write_row
            for row in rows:
                write(row + tail)
                n += 1
        dt = time.perf_counter() - t0
        self.rows += n
        self.seconds += dt
        self.chunk_rates.append(n / dt if dt > 0 else float("inf"))
        return n


_SEQUENCES: dict[str, str] = {}  # table -> its id sequence


def _sequence(cursor: Any, model: Any) -> str:
    table = model._meta.db_table
    if table not in _SEQUENCES:
        cursor.execute("SELECT pg_get_serial_sequence(%s, %s)", (table, model._meta.pk.column))
        _SEQUENCES[table] = cursor.fetchone()[0]
    return _SEQUENCES[table]


def reserve_ids(cursor: Any, model: Any, n: int) -> list[int]:
    """Take n ids from the table's own sequence, so rows can reference each other before insert.
    The sequence is looked up once: resolving it in every row's ``nextval`` cost six times more."""
    return reserve_ids_many(cursor, [(model, n)])[0]


def reserve_ids_many(cursor: Any, wanted: list[tuple[Any, int]]) -> list[list[int]]:
    """``reserve_ids`` for several tables in one round trip. The ids come back as one
    comma-joined string per table: a row per id cost the client more than the server."""
    parts, params = [], []
    for model, n in wanted:
        parts.append("(SELECT string_agg(nextval(%s::regclass)::text, ',') FROM generate_series(1, %s))")
        params += [_sequence(cursor, model), n]
    cursor.execute("SELECT " + ", ".join(parts), params)
    return [list(map(int, s.split(","))) if s else [] for s in cursor.fetchone()]


def bulk_load_settings(cursor: Any, models: list[Any]) -> None:
    """Settings for a bulk load into these models' tables (call in its transaction, before the
    first COPY).

    Foreign keys are checked as each COPY runs (parents are written first) instead of queueing
    millions of deferred checks for the commit.

    And no VACUUM or ANALYZE of the tables until the commit. A load's rows are invisible to other
    sessions until then, so a VACUUM that runs meanwhile (autovacuum does, e.g. after ``--reset``
    deleted a project) records a table of millions of pages as holding no rows. The load's cached
    foreign-key check plans are replanned against that, and with every index estimated at no
    rows, the cheapest on paper can be one the key is not a prefix of: each comparison entry's
    (sample, prompt) check scanned ``sample_unique_content`` by ``prompt_id`` from end to end, and
    a seed writing 80,000 rows/s fell to 100 (issue 11; docs/BENCHMARKS.md). SHARE UPDATE
    EXCLUSIVE is the lock VACUUM and ANALYZE take and conflicts with no reads or writes, so
    labeling goes on; autovacuum skips locked tables and comes back after the commit, when the
    rows count. Two bulk loads into the same tables run one after the other."""
    from django.db import connection

    cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    tables = ", ".join(connection.ops.quote_name(m._meta.db_table) for m in models)
    cursor.execute(f"LOCK TABLE {tables} IN SHARE UPDATE EXCLUSIVE MODE")
