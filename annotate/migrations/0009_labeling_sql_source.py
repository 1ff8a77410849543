"""The labeling functions move to a source file of their own, ``annotate/sql/labeling.sql``.

Nothing changes in the database: this migration runs ``sql/0009_labeling.sql``, a frozen copy of
that source as it stands now (0005's functions with 0007's ``rl_submit``), with
``CREATE OR REPLACE``. From here on a change to the functions is an edit of the source plus a new
migration that loads a copy of it, so a diff shows the change and an old migration still replays
the functions as they were. ``tests/annotate/test_labeling_sql.py`` checks that the installed
functions equal the source.
"""

from pathlib import Path
from typing import Any

from django.db import migrations

COPY = Path(__file__).with_name("sql") / "0009_labeling.sql"


def _load(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(COPY.read_text(encoding="utf-8"), params=None)  # None: % is not a placeholder


class Migration(migrations.Migration):
    dependencies = [("annotate", "0008_skipped_leases_index")]

    # Reversing leaves the same functions in place: they are 0007's.
    operations = [migrations.RunPython(_load, reverse_code=migrations.RunPython.noop)]
