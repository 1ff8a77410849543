"""`manage.py import_preferences --format trl|pickapic FILE --project SLUG` (creates the project)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotate import imports
from annotate.errors import ServiceError


class Command(BaseCommand):
    help = "Import preference data (TRL JSONL or Pick-a-Pic Parquet) as judgments with source 'import'."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file")
        parser.add_argument("--format", required=True, choices=["trl", "pickapic"])
        parser.add_argument("--project", required=True, help="slug; created when missing")
        parser.add_argument("--as-user", dest="as_user", help="acting manager (default: first superuser)")

    def handle(self, *args: Any, **opts: Any) -> None:
        User = get_user_model()
        user = (
            User.objects.filter(username=opts["as_user"]).first()
            if opts["as_user"]
            else User.objects.filter(is_superuser=True).order_by("id").first()
        )
        if user is None:
            raise CommandError("no acting user: create a superuser or pass --as-user")
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
                )
        except ServiceError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"{result.rows} rows into {project.slug}: {result.judgments} judgments, {result.created} samples created, "
            f"{result.duplicates} reused"
        )
