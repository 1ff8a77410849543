"""`manage.py simulate_annotators --project SLUG`: M simulated annotators judge the project's
comparisons through the REST API (next, submit, skip), each with a hidden preference, noise,
position bias and speed; a share of them may be spammers. Over HTTP against a running server with
``--url``, or in-process through the same Django request stack without it."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotate.errors import ServiceError
from annotate.models import Project
from simulate.services import simulated_annotators_run

_FOLLOW_WAIT_S = 3.0  # with --follow, between looks at an empty queue


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="the project's slug")
        parser.add_argument("--annotators", type=int, default=3, help="how many (1-200)")
        parser.add_argument(
            "--preference",
            default="brightness",
            help="brightness, color:#rrggbb, length, structure, keyword:<word> or reward_model:<dir>",
        )
        parser.add_argument("--noise", type=float, default=0.1, help="share of verdicts flipped")
        parser.add_argument(
            "--position-bias", type=float, default=0.0, help="share of 'left' whatever is shown"
        )
        parser.add_argument(
            "--spammers", type=float, default=0.0, help="share of annotators who answer at random"
        )
        parser.add_argument("--think-ms", type=float, default=0.0, help="mean time per judgment")
        parser.add_argument(
            "--labels", type=int, default=None, help="judgments per annotator (default: until none left)"
        )
        parser.add_argument(
            "--url", default="", help="a running server, e.g. http://127.0.0.1:8000 (default: in-process)"
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--follow",
            action="store_true",
            help="keep going: when nothing is left to judge, wait for new comparisons (Ctrl-C stops)",
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help="wait for the project to be created (polling every 5 s) instead of refusing",
        )

    def handle(self, *args: Any, **o: Any) -> None:
        project = Project.objects.filter(slug=o["project"]).first()
        while project is None and o["wait"]:
            time.sleep(5.0)
            project = Project.objects.filter(slug=o["project"]).first()
        if project is None:
            raise CommandError(f"no project {o['project']!r}")
        total = o["labels"] * o["annotators"] if o["labels"] and not o["follow"] else None
        bar = tqdm(total=total, unit="label", desc=f"{o['annotators']} simulated annotators")
        before = [0]  # judgments of the earlier passes (with --follow)
        totals: dict[str, Any] = {"judgments": 0, "skips": 0, "errors": {}}
        stop = threading.Event()
        if o["follow"]:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while True:
                out = simulated_annotators_run(
                    project_id=project.id, annotators=o["annotators"], preference=o["preference"],
                    noise=o["noise"], position_bias=o["position_bias"], spammers=o["spammers"],
                    think_ms=o["think_ms"], labels=o["labels"], seed=o["seed"], url=o["url"],
                    progress=lambda done: bar.update(before[0] + done - bar.n),
                )  # fmt: skip
                before[0] = bar.n
                totals["judgments"] += out["judgments"]
                totals["skips"] += out["skips"]
                for k, v in out["errors"].items():
                    totals["errors"][k] = totals["errors"].get(k, 0) + v
                if not o["follow"] or stop.wait(_FOLLOW_WAIT_S):
                    break
        except ServiceError as exc:
            raise CommandError(exc.message) from exc
        except KeyboardInterrupt:
            pass
        finally:
            bar.close()
        self.stdout.write(
            f"{totals['judgments']} judgments, {totals['skips']} skips, errors {totals['errors'] or 'none'}"
        )
