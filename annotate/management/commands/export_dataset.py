"""`manage.py export_dataset --project SLUG --schema trl --format jsonl --out FILE [filters]`."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotate import exports, services
from annotate.errors import ServiceError
from annotate.management.acting import acting_user
from annotate.selectors import project_get


class Command(BaseCommand):
    help = "Export a preference dataset (streamed), or build an immutable snapshot with --snapshot."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True)
        parser.add_argument("--schema", default="trl", choices=exports.SCHEMAS)
        parser.add_argument("--format", default="jsonl", choices=exports.FORMATS)
        parser.add_argument("--aggregate", choices=exports.AGGREGATES)
        parser.add_argument("--media", default="url", choices=exports.MEDIA_MODES)
        parser.add_argument("--since")
        parser.add_argument("--until")
        parser.add_argument("--min-agreement", dest="min_agreement")
        parser.add_argument("--exclude-paused", dest="exclude_paused", action="store_true")
        parser.add_argument("--gold", default="any", choices=["any", "only", "exclude"])
        parser.add_argument("--aspect")
        parser.add_argument(
            "--generator-versions",
            dest="generator_versions",
            help="ids or generator@version, comma-separated",
        )
        parser.add_argument("--modality", choices=["image", "video", "text"])
        parser.add_argument("--out", help="output file (default: stdout)")
        parser.add_argument("--snapshot", action="store_true", help="build a content-hashed snapshot instead")
        parser.add_argument("--name", default="", help="snapshot name")
        parser.add_argument(
            "--as-user", dest="as_user", help="user recorded on the snapshot (default: first superuser)"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            project = project_get(slug=opts["project"])
            params = {k: v for k, v in opts.items() if v not in (None, False)}
            if opts["exclude_paused"]:
                params["exclude_paused"] = "true"
            spec = exports.spec_from_params(params)
            exports.validate_for_project(project=project, spec=spec)
            if opts["snapshot"]:
                self._snapshot(project, spec, opts)
                return
            total = exports.count_judgments(project=project, spec=spec)
            out = open(opts["out"], "wb") if opts["out"] else sys.stdout.buffer  # noqa: SIM115
            try:
                with tqdm(total=total, unit="judgment", desc="export", disable=not opts["out"]) as bar:
                    rows, digest, size = exports.write(
                        project=project, spec=spec, out=out, progress=lambda n: bar.update(n - bar.n)
                    )
            finally:
                if opts["out"]:
                    out.close()
        except ServiceError as exc:
            raise CommandError(exc.message) from exc
        if opts["out"]:
            self.stderr.write(f"{rows} rows, {size} bytes, sha256 {digest} -> {opts['out']}")

    def _snapshot(self, project: Any, spec: Any, opts: dict[str, Any]) -> None:
        user = acting_user(opts["as_user"])
        snap = services.snapshot_create(
            project=project, actor=user, spec=spec, name=opts["name"], build_now=True
        )
        self.stdout.write(
            f"snapshot {snap.id}: {snap.row_count} rows, sha256 {snap.sha256}, file {snap.file.name}"
        )
