"""Set-based writes: COPY rows into a model's table, with ids taken from its own sequence first so
rows can reference each other before they are inserted. Used by the preference import and the load
benchmark's seeding; the caller validates every value before it gets here."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


COPY_NULL = "\\N"  # NULL in COPY's text format


def copy_escape(value: str) -> str:
    """A string as a field of COPY's text format: backslash, tab, newline and CR escaped."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    return value.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_field(value: Any) -> str:
    if value is None:
        return COPY_NULL
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return copy_escape(value)
    raise TypeError(f"no COPY text form for {type(value).__name__}")


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
        # The defaults as COPY text, rendered once: ``copy_lines`` adds them to every line.
        self.tail_text = "".join("\t" + _copy_field(v) for v in self.tail) + "\n"
        self.rows = 0
        self.seconds = 0.0  # inside COPY (the server's work: parsing, indexes, foreign-key checks)
        self.chunk_rates: list[float] = []  # rows/s of each COPY, in order

    def copy_lines(self, cursor: Any, lines: Iterable[str]) -> int:
        """COPY rows the caller has formatted: each line holds the given columns in COPY's text
        format (tab-separated, ``\\N`` for NULL, strings through ``copy_escape``), with no
        newline. Faster than ``copy`` for hot loops: psycopg formats each value by looking up its
        dumper, here an f-string does it. Sent in blocks of about 1,000 rows."""
        tail = self.tail_text
        n = 0
        t0 = time.perf_counter()
        with cursor.copy(self.sql) as cp:
            block: list[str] = []
            for line in lines:
                block.append(line)
                if len(block) >= 1000:
                    cp.write(tail.join(block) + tail)
                    n += len(block)
                    block = []
            if block:
                cp.write(tail.join(block) + tail)
                n += len(block)
        self._count(n, time.perf_counter() - t0)
        return n

    def _count(self, n: int, dt: float) -> None:
        self.rows += n
        self.seconds += dt
        self.chunk_rates.append(n / dt if dt > 0 else float("inf"))

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
        self._count(n, time.perf_counter() - t0)
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


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key as the catalog has it: ``child(columns)`` references ``parent(parent_columns)``."""

    name: str
    child: str
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]


def foreign_keys(cursor: Any, tables: list[str]) -> list[ForeignKey]:
    """Every foreign key whose referencing table is one of these, from ``pg_constraint``."""
    cursor.execute(
        """
        SELECT c.conname, c.conrelid::regclass::text, c.confrelid::regclass::text,
          ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
          ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i)
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.conrelid = ANY(%s::regclass[])
        ORDER BY c.conrelid::regclass::text, c.conname
        """,
        (tables,),
    )
    return [
        ForeignKey(name, child.strip('"'), tuple(cols), parent.strip('"'), tuple(pcols))
        for name, child, parent, cols, pcols in cursor.fetchall()
    ]


class BulkLoad:
    """Settings for a bulk load into these models' tables, made in its transaction before the
    first COPY by ``bulk_load_settings``.

    **No VACUUM or ANALYZE of the tables until the commit.** A load's rows are invisible to other
    sessions until then, so a VACUUM that runs meanwhile (autovacuum does, e.g. after ``--reset``
    deleted a project) records a table of millions of pages as holding no rows. The load's cached
    foreign-key check plans are replanned against that, and with every index estimated at no
    rows, the cheapest on paper can be one the key is not a prefix of: each comparison entry's
    (sample, prompt) check scanned ``sample_unique_content`` by ``prompt_id`` from end to end, and
    a seed writing 80,000 rows/s fell to 100 (issue 11; docs/BENCHMARKS.md). SHARE UPDATE
    EXCLUSIVE is the lock VACUUM and ANALYZE take and conflicts with no reads or writes, so
    labeling goes on; autovacuum skips locked tables and comes back after the commit, when the
    rows count. Two bulk loads into the same tables run one after the other.

    **Foreign keys**, by default, are checked as each COPY runs (parents are written first), not
    queued as millions of deferred checks for the commit. With ``batch_foreign_keys``, where the
    database lets this role (a superuser, or PostgreSQL 15+ with ``GRANT SET ON PARAMETER
    session_replication_role``) and the tables have no triggers of their own, the per-row checks
    are turned off for the load (``session_replication_role = replica``, which skips exactly the
    foreign-key triggers here) and ``check_written`` checks each batch's rows set-wise instead:
    every key of every foreign key, with the parent rows locked ``FOR KEY SHARE`` as the per-row
    checks would lock them, so a concurrent delete waits for the commit or is seen. The per-row
    checks were half of the server's time in the preference import (one SPI query and lock per
    row and key: 40 of 75 us per pair). ``finish`` turns them back on."""

    def __init__(self, cursor: Any, models: list[Any], *, batch_foreign_keys: bool = False) -> None:
        from django.db import connection

        self.tables = [m._meta.db_table for m in models]
        self.pk = {m._meta.db_table: m._meta.pk.column for m in models}
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        quoted = ", ".join(connection.ops.quote_name(t) for t in self.tables)
        cursor.execute(f"LOCK TABLE {quoted} IN SHARE UPDATE EXCLUSIVE MODE")
        self.batched = batch_foreign_keys and self._may_skip_row_checks(cursor)
        self.keys = foreign_keys(cursor, self.tables) if self.batched else []
        self._sql: dict[tuple[str, ...], str] = {}
        if self.batched:
            cursor.execute("SET LOCAL session_replication_role = replica")

    def _may_skip_row_checks(self, cursor: Any) -> bool:
        cursor.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = ANY(%s::regclass[]) AND NOT tgisinternal",
            (self.tables,),
        )
        if cursor.fetchone()[0]:
            return False  # replica mode would skip those triggers too
        cursor.execute(
            "SELECT current_setting('is_superuser') = 'on', current_setting('server_version_num')::int"
        )
        superuser, version = cursor.fetchone()
        if superuser:
            return True
        if version < 150000:
            return False
        cursor.execute("SELECT has_parameter_privilege('session_replication_role', 'SET')")
        return bool(cursor.fetchone()[0])

    def check_written(self, cursor: Any, written: dict[str, list[int]]) -> None:
        """Check (and lock the parents of) every foreign key of the rows just written, by table
        and id: one statement for the lot. Raises ``IntegrityError`` naming the constraint."""
        if not self.batched:
            return
        from django.db import IntegrityError, connection

        quote = connection.ops.quote_name
        keys = [k for k in self.keys if written.get(k.child)]
        if not keys:
            return
        tables = tuple(sorted({k.child for k in keys}))
        sql = self._sql.get(tables)
        if sql is None:
            ctes, selects = [], []
            for i, k in enumerate(keys):
                cols = ", ".join(f"c.{quote(c)}" for c in k.columns)
                not_null = " AND ".join(f"c.{quote(c)} IS NOT NULL" for c in k.columns)
                join = " AND ".join(
                    f"p.{quote(pc)} = k{i}.{quote(c)}"
                    for c, pc in zip(k.columns, k.parent_columns, strict=True)
                )
                # MATCH SIMPLE: a key with a NULL column references nothing.
                ctes.append(
                    f"k{i} AS MATERIALIZED (SELECT DISTINCT {cols} FROM {quote(k.child)} c"
                    f" WHERE c.{quote(self.pk[k.child])} = ANY(string_to_array(%(t_{k.child})s, ',')::bigint[])"
                    f" AND {not_null})"
                )
                # Each key looked up by itself, as the per-row check's query does: joined as sets,
                # the planner may hash a whole parent table for a chunk's 2,000 keys.
                ctes.append(
                    f"l{i} AS (SELECT 1 FROM k{i}, LATERAL (SELECT 1 FROM ONLY {quote(k.parent)} p"
                    f" WHERE {join} FOR KEY SHARE OF p) x)"
                )
                selects.append(f"SELECT {i}, (SELECT count(*) FROM k{i}) - (SELECT count(*) FROM l{i})")
            sql = "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(selects)
            self._sql[tables] = sql
        cursor.execute(sql, {f"t_{t}": ",".join(map(str, written[t])) for t in tables})
        for i, missing in cursor.fetchall():
            if missing:
                k = keys[i]
                raise IntegrityError(
                    f'insert into "{k.child}" violates foreign key constraint "{k.name}": {missing} keys'
                    f" ({', '.join(k.columns)}) not present in {k.parent}"
                )

    @contextmanager
    def row_checks(self, cursor: Any) -> Iterator[None]:
        """Per-row checks on for what runs inside: writes to tables ``check_written`` does not
        cover (e.g. a new generator version mid-import)."""
        if not self.batched:
            yield
            return
        cursor.execute("SET LOCAL session_replication_role = origin")
        yield
        cursor.execute("SET LOCAL session_replication_role = replica")

    def finish(self, cursor: Any) -> None:
        """Per-row checks back on, for whatever else runs in this transaction."""
        if self.batched:
            cursor.execute("SET LOCAL session_replication_role = origin")
            self.batched = False


def bulk_load_settings(cursor: Any, models: list[Any], *, batch_foreign_keys: bool = False) -> BulkLoad:
    """``BulkLoad``: call in the load's transaction before its first COPY."""
    return BulkLoad(cursor, models, batch_foreign_keys=batch_foreign_keys)
