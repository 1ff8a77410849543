"""A fresh checkout's database gets its tables before the first command that needs them.

``manage.py up`` migrates on start; every other command (``import_preferences``, the benchmark
seeds, ``train_reward_model``...) would otherwise die on ``relation "auth_user" does not exist``
when run first. On the embedded PostgreSQL under ``var/`` the migrations are applied (it is this
checkout's own database); on a database given by ``DATABASE_URL`` nothing is changed behind the
operator's back: one line says what to run, and the command goes on (``dbshell``, ``shell`` and
the like are what an operator needs after a half-failed migration).
"""

from __future__ import annotations

import sys

# Commands that manage migrations themselves, or need no database.
SKIP = {
    "migrate",
    "makemigrations",
    "showmigrations",
    "sqlmigrate",
    "squashmigrations",
    "optimizemigration",
    "help",
    "version",
    "check",
    "collectstatic",
    "spectacular",
    "up",
    "test",
    "dbshell",
}


def pending_migrations() -> int:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    return len(executor.migration_plan(executor.loader.graph.leaf_nodes()))


def ensure_migrated(*, quiet: bool = False) -> None:
    """Apply pending migrations to the embedded database, or exit with what to run (call after
    ``django.setup()``)."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db import DatabaseError

    try:
        pending = pending_migrations()
    except DatabaseError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.exit(f"cannot reach the database ({first}); is it running, and is DATABASE_URL right?")
    if not pending:
        return
    if not settings.EMBEDDED_POSTGRES:
        print(
            f"warning: the database has {pending} unapplied migration(s); run `python manage.py migrate`",
            file=sys.stderr,
        )
        return
    if not quiet:
        print(f"applying {pending} migration(s) to the embedded database under var/ ...", file=sys.stderr)
    call_command("migrate", interactive=False, verbosity=0)
