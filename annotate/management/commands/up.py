"""`manage.py up`: database, broker, migrations, web server, Celery worker and beat as one tree.

Ctrl-C (or SIGTERM) stops the children, then the embedded Redis and PostgreSQL, and exits.
Children get PR_SET_PDEATHSIG, so even a killed `up` leaves no orphans behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from config import embedded

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    os.setpgrp()  # Ctrl-C reaches `up` only; it stops the children in order.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Command(BaseCommand):
    help = "Start PostgreSQL, Redis, migrations, gunicorn, a Celery worker and beat; Ctrl-C stops all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("RL_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("RL_PORT", "8000")))
        parser.add_argument(
            "--workers",
            type=int,
            default=int(os.environ.get("RL_WEB_WORKERS", "0")),
            help="gunicorn workers (default: cores + 1)",
        )
        parser.add_argument("--no-worker", action="store_true", help="do not start Celery worker and beat")
        parser.add_argument(
            "--seed-demo",
            action="store_true",
            help="seed the demo projects first (the loop demos' generators train on the first run), "
            "and run the loop demos' simulated annotators beside the server",
        )
        parser.add_argument(
            "--demo-annotators",
            type=int,
            default=int(os.environ.get("RL_DEMO_ANNOTATORS", "3")),
            help="with --seed-demo: simulated annotators judging each loop demo (0: none)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.optional: set[str] = set()
        self.stopping = False
        embedded_db = settings.EMBEDDED_POSTGRES
        embedded_redis = settings.EMBEDDED_REDIS
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        code = 0
        try:
            self.stdout.write("Applying migrations...")
            call_command("migrate", interactive=False, verbosity=0)
            if opts["seed_demo"]:
                call_command("seed_demo", loop=True)
            # Our own connection is not needed by the children; close it before forking.
            from django.db import connections

            connections.close_all()
            self._start(opts)
            url = f"http://{opts['host']}:{opts['port']}/"
            self.stdout.write(self.style.SUCCESS(f"\nRewardloop is up: {url}"))
            self.stdout.write(f"  API docs: {url}api/docs/   admin: {url}admin/")
            if opts["seed_demo"]:
                self.stdout.write("  demo login: demo / demo")
                self.stdout.write(f"  the loop at work: {url}projects/loop/loop/  (README: what to look at)")
                self.stdout.write(
                    f"  the text and video loops: {url}projects/loop-text/loop/ and "
                    f"{url}projects/loop-video/loop/ (once their generators have trained)"
                )
            self.stdout.write("Press Ctrl-C to stop everything.\n")
            code = self._supervise()
        finally:
            self._stop_children()
            if embedded_redis:
                embedded.stop_redis(settings.VAR_DIR)
            if embedded_db:
                embedded.stop_postgres(settings.VAR_DIR)
            self.stdout.write("Stopped.")
        if code:
            sys.exit(code)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _spawn(self, name: str, argv: list[str], *, optional: bool = False) -> None:
        """Start a child; when it exits everything stops, unless it is ``optional`` (a one-off
        job such as training the video demo's generator: its end is reported, the rest runs on)."""
        proc = subprocess.Popen(argv, cwd=settings.BASE_DIR, preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        if optional:
            self.optional.add(name)

    def _start(self, opts: dict[str, Any]) -> None:
        py = sys.executable
        # Measured on 2 cores (docs/BENCHMARKS.md): one process per core plus one, each with six
        # threads (config/gunicorn.py) to overlap database round trips, beat more processes or more
        # threads.
        workers = opts["workers"] or ((os.cpu_count() or 1) + 1)
        self._spawn(
            "web",
            [
                py,
                "-m",
                "gunicorn",
                "config.wsgi:application",
                "--config",
                "python:config.gunicorn",
                "--bind",
                f"{opts['host']}:{opts['port']}",
                "--workers",
                str(workers),
                "--graceful-timeout",
                "10",
                "--timeout",
                "120",
            ]
            # No access log unless asked for: even to /dev/null, gunicorn formats every line
            # (~7% of a web worker's CPU on the labeling path).
            + (["--access-logfile", "-"] if os.environ.get("RL_ACCESS_LOG") else []),
        )
        if not opts["no_worker"]:
            self._spawn(
                "worker",
                [
                    py,
                    "-m",
                    "celery",
                    "-A",
                    "config",
                    "worker",
                    "-Q",
                    "default,gpu",
                    "--concurrency",
                    os.environ.get("RL_WORKER_CONCURRENCY", "2"),
                    "--loglevel",
                    "WARNING",
                    "-n",
                    "embedded@%h",
                ],
            )
            self._spawn(
                "beat",
                [
                    py,
                    "-m",
                    "celery",
                    "-A",
                    "config",
                    "beat",
                    "--loglevel",
                    "WARNING",
                    "--pidfile=",
                    "-S",
                    "django_celery_beat.schedulers:DatabaseScheduler",
                ],
            )
        if opts["seed_demo"] and opts["demo_annotators"] > 0:
            # The loop demos' simulated annotators judge over HTTP like people (the command is the
            # simulate app's; `up` only names the projects and what their annotators prefer).
            # The text and video demos' projects appear once their generators have trained
            # (below): their annotators wait for them.
            for name, slug, preference in (
                ("annotators", "loop", "brightness"),
                ("annotators-text", "loop-text", "structure"),
                ("annotators-video", "loop-video", "brightness"),
            ):
                self._spawn(
                    name,
                    [
                        py, "manage.py", "simulate_annotators", "--project", slug, "--follow", "--wait",
                        "--url", f"http://{opts['host']}:{opts['port']}",
                        "--annotators", str(opts["demo_annotators"]), "--think-ms", "1500", "--noise", "0.1",
                        "--preference", preference,
                    ],
                )  # fmt: skip
        if opts["seed_demo"]:
            # The text and video demos' generators train for minutes at the first run: in the
            # background, one after the other, at the lowest CPU priority, so the image demo's loop
            # (trained before the server started) keeps its pace.
            self._spawn(
                "demo-generators",
                [py, "manage.py", "seed_demo", "--text-loop", "--video-loop", "--background"],
                optional=True,
            )

    def _supervise(self) -> int:
        while not self.stopping:
            for name, proc in list(self.children):
                rc = proc.poll()
                if rc is None:
                    continue
                if name in self.optional:
                    self.stderr.write(f"{name} exited with code {rc}; the rest runs on")
                    self.children.remove((name, proc))
                    continue
                self.stderr.write(f"{name} exited with code {rc}; stopping everything")
                return rc or 1
            time.sleep(0.2)
        return 0

    def _stop_children(self) -> None:
        for _, proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for _, proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Anything left in the child's process group (pool workers) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
