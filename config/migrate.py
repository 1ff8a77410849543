"""A fresh checkout's database gets its tables before the first command that needs them.

``manage.py up`` migrates on start; every other command (``import_preferences``, the benchmark
seeds, ``train_reward_model``...) would otherwise die on ``relation "auth_user" does not exist``
when run first. On the embedded PostgreSQL under ``var/`` the migrations are applied (it is this
checkout's own database); on a database given by ``DATABASE_URL`` nothing is changed behind the
operator's back: the command stops with one line saying what to run.
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

    pending = pending_migrations()
    if not pending:
        return
    if not settings.EMBEDDED_POSTGRES:
        sys.exit(f"the database has {pending} unapplied migration(s); run `python manage.py migrate` first")
    if not quiet:
        print(f"applying {pending} migration(s) to the embedded database under var/ ...", file=sys.stderr)
    call_command("migrate", interactive=False, verbosity=0)
