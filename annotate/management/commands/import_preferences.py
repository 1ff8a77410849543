"""`manage.py import_preferences --format trl|pickapic FILE --project SLUG` (creates the project)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotate import imports
from annotate.errors import ServiceError
from annotate.management.acting import acting_user


class Command(BaseCommand):
    help = "Import preference data (TRL JSONL or Pick-a-Pic Parquet) as judgments with source 'import'."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file")
        parser.add_argument("--format", required=True, choices=["trl", "pickapic"])
        parser.add_argument("--project", required=True, help="slug; created when missing")
        parser.add_argument(
            "--on-error",
            dest="on_error",
            choices=["fail", "skip"],
            default="fail",
            help="fail (default): one broken row refuses the file; skip: import the rest and list them",
        )
        parser.add_argument("--as-user", dest="as_user", help="acting manager (default: first superuser)")

    def handle(self, *args: Any, **opts: Any) -> None:
        user = acting_user(opts["as_user"])
        path = Path(opts["file"])
        if not path.is_file():
            raise CommandError(f"{path} is not a file")
        try:
            project = imports.project_for_import(slug=opts["project"], actor=user, fmt=opts["format"])
            with path.open("rb") as fh, tqdm(unit="row", desc="import") as bar:
                result = imports.preferences_import(
                    project=project,
                    actor=user,
                    fmt=opts["format"],
                    file=fh,
                    progress=lambda n: bar.update(n - bar.n),
                    on_error=opts["on_error"],
                )
        except ServiceError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"{result.rows} rows into {project.slug}: {result.judgments} judgments, {result.created} samples created, "
            f"{result.duplicates} reused, {result.skipped} broken rows skipped"
        )
        for skip in result.skipped_rows:
            self.stdout.write(f"skipped row {skip['row']}: {skip['reason']}")
        if result.skipped > len(result.skipped_rows):
            self.stdout.write(f"... and {result.skipped - len(result.skipped_rows)} more skipped rows")
