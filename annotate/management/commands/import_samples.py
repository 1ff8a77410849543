"""`manage.py import_samples --project SLUG PATH` (a zip or a folder with manifest.jsonl/csv)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotate import imports
from annotate.errors import ServiceError
from annotate.management.acting import acting_user
from annotate.selectors import project_get


class Command(BaseCommand):
    help = "Import samples from a zip or folder with a manifest (prompt, path|text, generator, ...)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path")
        parser.add_argument("--project", required=True)
        parser.add_argument("--manifest", help="manifest file name inside the upload")
        parser.add_argument("--as-user", dest="as_user", help="acting manager (default: first superuser)")

    def handle(self, *args: Any, **opts: Any) -> None:
        user = acting_user(opts["as_user"])
        path = Path(opts["path"])
        if not path.exists():
            raise CommandError(f"{path} does not exist")
        try:
            project = project_get(slug=opts["project"])
            with tqdm(unit="row", desc="validate") as bar:
                source: Any = path if path.is_dir() else path.open("rb")
                result = imports.samples_import(
                    project=project,
                    actor=user,
                    source=source,
                    manifest=opts["manifest"],
                    progress=lambda n: bar.update(n - bar.n),
                )
        except ServiceError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"{result.rows} rows: {result.created} samples created, {result.duplicates} duplicates"
        )
