"""gunicorn settings and hooks, loaded by `manage.py up` and the docker image
(``-c python:config.gunicorn``); the bind address and worker count come from their command lines,
and ``GUNICORN_CMD_ARGS`` overrides anything here.

Keep-alive connections stay with the worker process that accepted them. When a burst of clients
connects, one idle worker can take most of them (16 annotators came out 3/11/3 over 3 workers),
and the clients on the crowded worker then wait behind each other while the other workers idle:
that was the slow tail of the labeling benchmark. So a worker holding more connections than it has
threads answers a small share of its requests with ``Connection: close``. The client reconnects
at once, and the accept goes to whichever worker is first to take it, usually a less busy one, so
connections drift to where there is room. A reconnect costs well under a millisecond; with
connections spread evenly nothing is closed.

The application is imported once in the master (``preload_app``) and workers are forked from it.
A worker restarted by ``max_requests`` then starts in milliseconds, already warm, instead of
importing Django again for about a second of CPU while its siblings serve; on 2 cores that import
had shown up as a latency spike in the labeling benchmark. ``config/wsgi.py`` freezes the startup
objects before the fork, so they stay shared between workers instead of being copied.
"""

from __future__ import annotations

import random
from typing import Any

# gthread keeps HTTP connections alive (the sync worker closes each one); threads overlap
# database round trips.
worker_class = "gthread"
threads = 6
keepalive = 30

preload_app = True

# Recycle a worker now and then in case something leaks, but rarely: at the benchmark's 500
# requests/s a limit of 20,000 restarted every worker every two minutes.
max_requests = 200_000
max_requests_jitter = 20_000


def when_ready(server: Any) -> None:
    # Workers fork from the master after it imported the app: a database connection opened during
    # the import would be shared by every worker's process. Nothing opens one today; make sure.
    from django.db import connections

    connections.close_all()


# Share of a crowded worker's requests that close their connection (a handful per second).
SHED_SHARE = 0.02


def pre_request(worker: Any, req: Any) -> None:
    if getattr(worker, "nr_conns", 0) > worker.cfg.threads and random.random() < SHED_SHARE:
        req.must_close = True
