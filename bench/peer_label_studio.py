"""Peer benchmark: Label Studio 1.23 on the same annotation workload as bench/annotation_load.py.

Not a test. Both systems run on one private Debian PostgreSQL 15 cluster (Label Studio's migrations
need pg_trgm, which the embedded pgserver wheel lacks), so the ratios come from one machine, one run:

    .venv/bin/python bench/peer_label_studio.py setup        # cluster, databases, Label Studio venv
    .venv/bin/python bench/peer_label_studio.py seed --tasks 100000 --annotators 16
    .venv/bin/python bench/peer_label_studio.py run --annotators 16 --duration 60 --json var/peer/run.json
    .venv/bin/python bench/peer_label_studio.py export --labeled 100000 --harakiri 0
    .venv/bin/python bench/peer_label_studio.py teardown     # servers and cluster stop

Everything lives under var/peer/: the cluster (pg/, socket in pg-sock/, no TCP listener), Label
Studio's virtualenv (ls-venv/) and data dir (ls-data/), our var dir (rl/), and results.json, which
every step merges its figures into.

Label Studio is served the way its docker-compose file serves it: uWSGI with the settings of its
deploy/uwsgi.ini (2 processes per core, 1 thread, master, HTTP router, harakiri 120 s);
``--server runserver`` measures `label-studio start` (Django's threaded runserver) instead, which is
what a pip install gives. Ours is `manage.py up` (gunicorn gthread, Celery, embedded Redis).

`export` compares like with like: a project of --labeled tasks each carrying one annotation
(imported through LS's import API) against our project of as many judged comparisons
(bench/export.py seed, then bench/export.py run). LS's synchronous export of 100k labeled tasks
outlives its own 120 s harakiri; pass --harakiri 0 to measure how long it really takes.

The two cores are shared with whatever else runs on the machine, so every measured phase first
waits for other processes to go quiet and then reports how much CPU they took during the phase
(foreign_cpu_cores_avg): a figure taken next to someone else's load is not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import requests
from annotation_load import (
    _ANSWER_BODIES,
    REQUEST_TIMEOUT_S,
    WorkerResult,
    _percentiles,
    _show_progress,
    machine_info,
)
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER = REPO_ROOT / "var" / "peer"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_DATA = PEER / "pg"
PG_SOCK = PEER / "pg-sock"
PG_LOG = PEER / "pg.log"
# With listen_addresses = '' the port only names the socket file (.s.PGSQL.5433); nothing binds TCP.
PG_PORT = 5433
LS_VENV = PEER / "ls-venv"
LS_DATA = PEER / "ls-data"
RL_VAR = PEER / "rl"
RESULTS = PEER / "results.json"
LS_STATE = PEER / "ls_seed.json"
RL_TOKENS = RL_VAR / "bench_tokens.json"
PIDFILES = {"ls": PEER / "ls-server.pid", "rl": PEER / "rl-server.pid"}
LS_SPEC = "label-studio==1.23.*"
LS_PROJECT_TITLE = "Peer benchmark: pairwise"
RL_PROJECT = "bench"
LS_ADMIN = "bench-admin@peer.invalid"
LS_PASSWORD = "bench-password"
# Same values as config/embedded.py gives the embedded cluster, so our side runs as it does there.
PG_TUNING = """
# peer benchmark (same as rewardloop embedded defaults)
max_connections = 300
shared_buffers = 256MB
work_mem = 16MB
maintenance_work_mem = 128MB
wal_compression = on
autovacuum_naptime = 10s
"""
# Text + Choices rather than the Pairwise tag: it has tie and both-bad like our projects do.
LABEL_CONFIG = """<View>
  <Header value="$prompt"/>
  <Text name="answer_a" value="$answer_a"/>
  <Text name="answer_b" value="$answer_b"/>
  <Choices name="choice" toName="answer_a" choice="single" required="true" showInline="true">
    <Choice value="A"/>
    <Choice value="B"/>
    <Choice value="Tie"/>
    <Choice value="Both bad"/>
  </Choices>
</View>"""
CHOICES = ("A", "B", "Tie", "Both bad")
MAX_TASKS = 1_000_000
MAX_ANNOTATORS = 64
MAX_DURATION_S = 1800.0
IMPORT_CHUNK = 5000


def say(msg: str) -> None:
    print(f"[peer] {msg}", flush=True)


def sh(
    argv: list[str], *, check: bool = True, quiet: bool = False, **kw: Any
) -> subprocess.CompletedProcess[str]:
    if not quiet:
        say("$ " + " ".join(argv))
    return subprocess.run(argv, check=check, text=True, **kw)


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv]


# --- results ---------------------------------------------------------------------------------------
def load_results() -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(RESULTS.read_text())
    except (FileNotFoundError, ValueError):
        data = {}
    return data


def save_results(section: str, figures: dict[str, Any]) -> dict[str, Any]:
    data = load_results()
    data["machine"] = machine_info()
    data[section] = figures | {"when": datetime.now(UTC).isoformat()}
    PEER.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))
    return data


def print_machine() -> None:
    m = machine_info()
    say(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}")


def _cpu_by_process() -> dict[int, tuple[float, str]]:
    out = {}
    for p in psutil.process_iter(["pid", "cpu_times", "cmdline", "name"]):
        t = p.info["cpu_times"]
        if t is None:
            continue
        out[p.info["pid"]] = (t.user + t.system, " ".join(p.info["cmdline"] or []) or p.info["name"] or "?")
    return out


def _own_pids() -> set[int]:
    """This script and its children (load generators, servers, their workers), the peer cluster's
    postmaster and backends, and anything else launched from var/peer (the embedded Redis of ours)."""
    own = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    pm = PG_DATA / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError):
        own |= {p.pid for p in process_tree(int(pm.read_text().split()[0]))}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(PEER) in " ".join(p.info["cmdline"] or []):
            own |= {p.info["pid"], *(c.pid for c in process_tree(p.info["pid"]))}
    return own


class ForeignCpu(threading.Thread):
    """CPU used by processes that are not part of the measurement, sampled every 2 s while it runs:
    the cores are shared, and someone else's load lands in one system's figures only."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.cpu_s = 0.0
        self.by_cmd: dict[str, float] = {}
        self.t0 = time.monotonic()

    def run(self) -> None:
        last = _cpu_by_process()
        while not self.stop_event.wait(2.0):
            now, own = _cpu_by_process(), _own_pids()
            for pid, (cpu, cmd) in now.items():
                if pid in own or pid not in last:
                    continue
                d = cpu - last[pid][0]
                if d > 0:
                    self.cpu_s += d
                    self.by_cmd[cmd[:80]] = self.by_cmd.get(cmd[:80], 0.0) + d
            last = now

    def result(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join()
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return {
            "foreign_cpu_cores_avg": round(self.cpu_s / elapsed, 3),
            "foreign_cpu_top": {
                k: round(v, 1) for k, v in sorted(self.by_cmd.items(), key=lambda kv: -kv[1])[:3]
            },
        }


def wait_quiet(max_wait_s: float, *, threshold_cores: float = 0.15) -> dict[str, Any]:
    """Wait until other processes leave the cores alone before measuring."""
    deadline = time.monotonic() + max_wait_s
    started = time.monotonic()
    while True:
        mon = ForeignCpu()
        mon.start()
        time.sleep(4.0)
        seen = mon.result()
        busy = seen["foreign_cpu_cores_avg"]
        if busy < threshold_cores or time.monotonic() >= deadline:
            break
        say(f"machine busy: others use {busy:.2f} cores ({seen['foreign_cpu_top']}); waiting for them")
        time.sleep(10)
    if busy >= threshold_cores:
        say(f"WARNING: others still use {busy:.2f} cores after {max_wait_s:g} s; measuring anyway")
    return {"foreign_cpu_cores_before": busy, "waited_for_idle_s": round(time.monotonic() - started)}


# --- PostgreSQL ------------------------------------------------------------------------------------
def pg_running() -> bool:
    if not (PG_DATA / "PG_VERSION").exists():
        return False
    r = sh(
        as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(PG_DATA), "status"]),
        check=False,
        quiet=True,
        capture_output=True,
    )
    return r.returncode == 0


def pg_ensure_installed() -> None:
    missing = (
        not (PG_BIN / "initdb").exists()
        or not Path("/usr/share/postgresql/15/extension/pg_trgm.control").exists()
    )
    if not missing:
        say("PostgreSQL 15 with contrib is installed")
        return
    before = _apt_clusters_online()
    sh(["apt-get", "update"])
    sh(
        ["apt-get", "install", "-y", "postgresql", "postgresql-contrib"],
        env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
    )
    # The package may start its default cluster; it is not ours, so stop what the install started.
    for cluster in _apt_clusters_online() - before:
        version, name = cluster
        sh(["pg_ctlcluster", version, name, "stop"], check=False)


def _apt_clusters_online() -> set[tuple[str, str]]:
    if not shutil.which("pg_lsclusters"):
        return set()
    r = sh(["pg_lsclusters", "--no-header"], check=False, quiet=True, capture_output=True)
    online = set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3] == "online":
            online.add((parts[0], parts[1]))
    return online


def pg_start() -> None:
    PEER.mkdir(parents=True, exist_ok=True)
    if not (PG_DATA / "PG_VERSION").exists():
        PG_DATA.mkdir(parents=True, exist_ok=True)
        shutil.chown(PG_DATA, "postgres", "postgres")
        PG_DATA.chmod(0o700)
        # Local socket only, trust: the socket directory is private to postgres (and root).
        sh(
            as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(PG_DATA),
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--auth=trust",
                ]
            ),
            stdout=subprocess.DEVNULL,
        )
        with (PG_DATA / "postgresql.conf").open("a") as fh:
            fh.write(PG_TUNING)
            fh.write(f"listen_addresses = ''\nport = {PG_PORT}\nunix_socket_directories = '{PG_SOCK}'\n")
    PG_SOCK.mkdir(parents=True, exist_ok=True)
    shutil.chown(PG_SOCK, "postgres", "postgres")
    PG_SOCK.chmod(0o700)
    if not PG_LOG.exists():
        PG_LOG.touch()
        shutil.chown(PG_LOG, "postgres", "postgres")
    if pg_running():
        say(f"cluster {PG_DATA} is running (socket {PG_SOCK})")
        return
    sh(
        as_postgres(
            [str(PG_BIN / "pg_ctl"), "-D", str(PG_DATA), "-l", str(PG_LOG), "-w", "-t", "60", "start"]
        ),
        stdout=subprocess.DEVNULL,
    )
    say(f"cluster {PG_DATA} started (socket {PG_SOCK}/.s.PGSQL.{PG_PORT}, no TCP)")


def pg_stop() -> None:
    if not pg_running():
        say("cluster is not running")
        return
    sh(
        as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(PG_DATA), "-m", "fast", "-w", "-t", "60", "stop"]),
        stdout=subprocess.DEVNULL,
    )
    say("cluster stopped")


def psql(db: str, sql: str) -> str:
    r = sh(
        [
            str(PG_BIN / "psql"),
            "-h",
            str(PG_SOCK),
            "-p",
            str(PG_PORT),
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atq",
            "-c",
            sql,
        ],
        quiet=True,
        capture_output=True,
    )
    return r.stdout.strip()


def pg_ensure_databases() -> None:
    for db in ("ls", "rl"):
        if psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
            psql("postgres", f'CREATE DATABASE "{db}"')
            say(f"created database {db}")
        else:
            say(f"database {db} exists")
    psql("ls", "CREATE EXTENSION IF NOT EXISTS pg_trgm")
    say("pg_trgm is in database ls")


def need_cluster() -> None:
    if not pg_running():
        pg_start()


# --- environments ----------------------------------------------------------------------------------
def ls_package_dir() -> Path:
    found = sorted(LS_VENV.glob("lib/python3*/site-packages/label_studio"))
    if not found:
        raise SystemExit(f"Label Studio is not installed in {LS_VENV}: run `setup` first")
    return found[0]


_DROP_ENV = {
    "DATABASE_URL",
    "REDIS_URL",
    "HOST",
    "PORT",
    "USERNAME",
    "PASSWORD",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "DJANGO_SETTINGS_MODULE",
}


def _base_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _DROP_ENV and not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "POSTGRE_", "RL_", "DB_"))
    }


def ls_env() -> dict[str, str]:
    """Label Studio's own variables (label_studio/core/settings/base.py and label_studio.py)."""
    return _base_env() | {
        "PATH": f"{LS_VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "DJANGO_SETTINGS_MODULE": "core.settings.label_studio",
        "DJANGO_DB": "default",
        "POSTGRE_NAME": "ls",
        "POSTGRE_USER": "postgres",
        "POSTGRE_PASSWORD": "",
        "POSTGRE_HOST": str(PG_SOCK),
        "POSTGRE_PORT": str(PG_PORT),
        "LABEL_STUDIO_BASE_DATA_DIR": str(LS_DATA),
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        # Offline machine: no error reports to sentry.io, no analytics, no PyPI version check.
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        # Token auth ("Authorization: Token ...") as our client speaks it; 1.23 defaults to JWT PATs.
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    }


def rl_database_url() -> str:
    return f"postgresql://postgres@:{PG_PORT}/rl?host={urllib.parse.quote(str(PG_SOCK))}"


def rl_env() -> dict[str, str]:
    # REDIS_URL stays unset: the embedded Redis under var/peer/rl is used, as in `manage.py up`'s default.
    return _base_env() | {"DATABASE_URL": rl_database_url(), "RL_VAR_DIR": str(RL_VAR)}


# --- setup -----------------------------------------------------------------------------------------
def cmd_setup(args: argparse.Namespace) -> int:
    print_machine()
    pg_ensure_installed()
    pg_start()
    pg_ensure_databases()
    ls_bin = LS_VENV / "bin" / "label-studio"
    if ls_bin.exists() and args.reinstall is False:
        say(f"Label Studio venv {LS_VENV} exists; reusing it")
    else:
        if not (LS_VENV / "bin" / "python").exists():
            # The venv module of the interpreter behind our venv (sys._base_executable).
            sh([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(LS_VENV)])
        pip = str(LS_VENV / "bin" / "pip")
        sh([pip, "install", "--upgrade", "pip"])
        say(f"installing {LS_SPEC} (a few minutes: ~170 packages)")
        sh([pip, "install", "--progress-bar", "on", LS_SPEC])
    if not (LS_VENV / "bin" / "uwsgi").exists():
        # Label Studio's production image serves through uWSGI (deploy/uwsgi.ini); it builds from source.
        say("installing uwsgi into the Label Studio venv (compiles, ~1 min)")
        sh([str(LS_VENV / "bin" / "pip"), "install", "uwsgi"])
    version = sh(
        [str(LS_VENV / "bin" / "python"), "-c", "import label_studio; print(label_studio.__version__)"],
        capture_output=True,
        quiet=True,
    ).stdout.strip()
    say(f"Label Studio {version} in {LS_VENV}")
    save_results("setup", {"label_studio": version, "postgresql": psql("postgres", "SHOW server_version")})
    return 0


# --- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ls_server(server: str, port: int, *, harakiri: int) -> subprocess.Popen[bytes]:
    pkg = ls_package_dir()
    log = (PEER / "ls-server.log").open("ab")
    if server == "uwsgi":
        procs = 2 * (os.cpu_count() or 1)
        # deploy/uwsgi.ini of Label Studio, minus what binds beyond 127.0.0.1 (stats server) and the
        # adaptive "cheaper" spawning (all workers start at once, so the warm-up does not vary).
        argv = [
            str(LS_VENV / "bin" / "uwsgi"),
            "--http",
            f"127.0.0.1:{port}",
            "--chdir",
            str(pkg),
            "--module",
            "core.wsgi:application",
            "--master",
            "--single-interpreter",
            "--processes",
            str(procs),
            "--threads",
            "1",
            "--enable-threads",
            "--thunder-lock",
            "--lazy-apps",
            "--need-app",
            "--die-on-term",
            "--vacuum",
            "--buffer-size",
            "65535",
            "--http-timeout",
            # LS ships 300 s; with harakiri off (0) a long export must not hit the router's timeout either.
            str(max(300, harakiri) if harakiri else 3600),
            "--harakiri",
            str(harakiri),
            "--post-buffering",
            "4096",
            "--max-requests",
            "5000",
            "--reload-on-rss",
            "2048",
            "--ignore-sigpipe",
            "--ignore-write-errors",
            "--disable-write-exception",
            "--disable-logging",
            "--log-5xx",
            "--env",
            "APP_WEBSERVER=uwsgi",
        ]
        desc = f"uWSGI, {procs} processes x 1 thread (Label Studio's deploy/uwsgi.ini settings)"
    else:
        argv = [
            str(LS_VENV / "bin" / "label-studio"),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        desc = "`label-studio start` (Django runserver, threaded)"
    say(f"starting Label Studio: {desc} on 127.0.0.1:{port}")
    say("$ " + " ".join(argv))
    proc = subprocess.Popen(
        argv, cwd=pkg, env=ls_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    PIDFILES["ls"].write_text(str(proc.pid))
    return proc


def start_rl_server(port: int) -> subprocess.Popen[bytes]:
    log = (PEER / "rl-server.log").open("ab")
    argv = [sys.executable, "manage.py", "up", "--port", str(port)]
    say(f"starting ours: {' '.join(argv)} (DATABASE_URL -> database rl, embedded Redis)")
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=rl_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    PIDFILES["rl"].write_text(str(proc.pid))
    return proc


def wait_http(
    url: str, *, proc: subprocess.Popen[bytes] | None, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(
                f"server exited with {proc.returncode} before answering {url}; see var/peer/*-server.log"
            )
        try:
            r = requests.get(url, headers=headers or {}, timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout_s:g} s (last: {last})")


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_server(name: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the server we started (its pid file), wait, then SIGKILL whatever of its tree is left."""
    pidfile = PIDFILES[name]
    pid = proc.pid if proc is not None else None
    if pid is None and pidfile.exists():
        with contextlib.suppress(ValueError):
            pid = int(pidfile.read_text().strip())
    if pid is None:
        return
    tree = process_tree(pid)
    if proc is None and tree and not _looks_like_ours(tree[0], name):
        say(f"pid {pid} in {pidfile} is not our {name} server any more; leaving it alone")
        pidfile.unlink(missing_ok=True)
        return
    if tree:
        say(f"stopping {name} server (pid {pid}, {len(tree)} processes)")
        with contextlib.suppress(psutil.NoSuchProcess):
            tree[0].send_signal(signal.SIGTERM)
        _gone, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    pidfile.unlink(missing_ok=True)


def _looks_like_ours(p: psutil.Process, name: str) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return (
        ("uwsgi" in cmd or "label-studio" in cmd) if name == "ls" else ("manage.py" in cmd and " up" in cmd)
    )


def stop_rl_redis() -> None:
    """Seeding and migrating load our settings, which start the embedded Redis under var/peer/rl."""
    sock = RL_VAR / "redis" / "redis.sock"
    if not sock.exists():
        return
    code = (
        f"from pathlib import Path; from config import embedded; embedded.stop_redis(Path({str(RL_VAR)!r}))"
    )
    sh([sys.executable, "-c", code], cwd=REPO_ROOT, env=rl_env(), check=False, quiet=True)


# --- seed ------------------------------------------------------------------------------------------
# Runs inside Label Studio's venv and Django (there is no API to create accounts): an organization
# with legacy token auth on, the admin, the annotators, their tokens. Prints one JSON line.
_LS_ACCOUNTS = r"""
import json, sys
import django
django.setup()
from organizations.models import Organization
from rest_framework.authtoken.models import Token
from users.models import User

admin_email, password, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def user(email, staff=False):
    u = User.objects.filter(email=email).first()
    if u is None:
        u = User.objects.create_user(email=email, password=password)
        u.username = email.split("@")[0]
        u.is_staff = u.is_superuser = staff
        u.save()
    return u

admin = user(admin_email, staff=True)
org = Organization.objects.first()
if org is None:
    org = Organization.create_organization(created_by=admin, title="Peer benchmark", legacy_api_tokens_enabled=True)
if hasattr(org, "jwt") and not org.jwt.legacy_api_tokens_enabled:
    org.jwt.legacy_api_tokens_enabled = True
    org.jwt.save()
people = [admin] + [user(f"bench-{i}@peer.invalid") for i in range(1, n + 1)]
for u in people:
    org.add_user(u)
    if u.active_organization_id != org.id:
        u.active_organization = org
        u.save(update_fields=["active_organization"])
tokens = {u.email: Token.objects.get_or_create(user=u)[0].key for u in people}
print("ACCOUNTS " + json.dumps({"organization": org.id, "tokens": tokens}))
"""


def ls_python(code: str, *argv: str) -> str:
    pkg = ls_package_dir()
    r = sh(
        [
            str(LS_VENV / "bin" / "python"),
            "-c",
            f"import sys; sys.path.insert(0, {str(pkg)!r})\n{code}",
            *argv,
        ],
        cwd=pkg,
        env=ls_env(),
        capture_output=True,
        quiet=True,
    )
    return r.stdout


def task_data(i: int) -> dict[str, str]:
    """The same texts bench/annotation_load.py seeds: a prompt and two answers of a few hundred bytes."""
    out = {"prompt": f"Bench prompt #{i}: explain topic {i % 97} to a new colleague."}
    for variant in ("a", "b"):
        body = _ANSWER_BODIES[(i * 2 + (variant == "b")) % len(_ANSWER_BODIES)]
        out[f"answer_{variant}"] = f"Answer {variant.upper()} to prompt #{i}.\n\n{body}"
    return out


def ls_migrate() -> float:
    pkg = ls_package_dir()
    t0 = time.perf_counter()
    sh(
        [str(LS_VENV / "bin" / "python"), "manage.py", "migrate", "--no-color", "-v", "0"],
        cwd=pkg,
        env=ls_env(),
    )
    return time.perf_counter() - t0


def ls_seed(args: argparse.Namespace) -> dict[str, Any]:
    say(f"Label Studio: migrations on database ls ({LS_DATA} as data dir)")
    LS_DATA.mkdir(parents=True, exist_ok=True)
    migrate_s = ls_migrate()
    say(f"migrations done in {migrate_s:.1f} s")
    say(f"Label Studio: admin + {args.annotators} annotator accounts and tokens (Django ORM in LS's venv)")
    out = ls_python(_LS_ACCOUNTS, LS_ADMIN, LS_PASSWORD, str(args.annotators))
    line = next((ln for ln in out.splitlines() if ln.startswith("ACCOUNTS ")), None)
    if line is None:
        raise SystemExit(f"account creation printed no result:\n{out[-2000:]}")
    accounts = json.loads(line.removeprefix("ACCOUNTS "))
    tokens: dict[str, str] = accounts["tokens"]
    admin_h = {"Authorization": f"Token {tokens[LS_ADMIN]}"}

    port = free_port()
    proc = start_ls_server(args.server, port, harakiri=args.harakiri)
    url = f"http://127.0.0.1:{port}"
    figures: dict[str, Any] = {"migrate_s": round(migrate_s, 1)}
    try:
        wait_http(f"{url}/api/projects/", proc=proc, timeout_s=180, headers=admin_h)
        r = requests.get(
            f"{url}/api/projects/", params={"title": LS_PROJECT_TITLE}, headers=admin_h, timeout=60
        )
        r.raise_for_status()
        found = [p for p in r.json().get("results", []) if p["title"] == LS_PROJECT_TITLE]
        if found and args.reset:
            say(f"--reset: deleting project {found[0]['id']} through the API")
            requests.delete(
                f"{url}/api/projects/{found[0]['id']}/", headers=admin_h, timeout=600
            ).raise_for_status()
            found = []
        if found:
            project = found[0]
            say(f"project {project['id']} exists")
        else:
            body = {
                "title": LS_PROJECT_TITLE,
                "label_config": LABEL_CONFIG,
                "maximum_annotations": 1,  # overlap 1, as our seed's default
                "sampling": "Sequential sampling",
                "show_skip_button": True,
            }
            r = requests.post(f"{url}/api/projects/", json=body, headers=admin_h, timeout=60)
            if r.status_code != 201:
                raise SystemExit(f"project create answered {r.status_code}: {r.text[:500]}")
            project = r.json()
            say(f"created project {project['id']} (Text + Choices: A / B / Tie / Both bad)")
        pid = project["id"]
        have = int(psql("ls", f"SELECT count(*) FROM task WHERE project_id = {pid}"))
        want = args.tasks
        figures |= {"project_id": pid, "tasks_before": have}
        if have >= want:
            say(f"project {pid} has {have} tasks already (>= {want}); nothing to import")
        else:
            say(
                f"importing tasks {have}..{want - 1} through POST /api/projects/{pid}/import "
                f"(JSON, {args.chunk} tasks a request; synchronous, LS OSS has no Redis queue)"
            )
            t0 = time.perf_counter()
            chunk_s = []
            with tqdm(total=want - have, unit="task", unit_scale=True, desc="ls import") as bar:
                for start in range(have, want, args.chunk):
                    batch = [{"data": task_data(i)} for i in range(start, min(want, start + args.chunk))]
                    c0 = time.perf_counter()
                    r = requests.post(
                        f"{url}/api/projects/{pid}/import", json=batch, headers=admin_h, timeout=3600
                    )
                    if r.status_code not in (200, 201):
                        raise SystemExit(f"import answered {r.status_code}: {r.text[:500]}")
                    chunk_s.append(time.perf_counter() - c0)
                    bar.update(len(batch))
                    bar.set_postfix_str(f"{len(batch) / chunk_s[-1]:.0f} tasks/s")
            import_s = time.perf_counter() - t0
            n = want - have
            figures |= {
                "imported": n,
                "import_s": round(import_s, 1),
                "import_tasks_per_s": round(n / import_s, 1),
                "import_chunk": args.chunk,
                "import_chunk_s_max": round(max(chunk_s), 1),
            }
            say(f"imported {n} tasks in {import_s:.1f} s ({n / import_s:,.0f} tasks/s)")
        t0 = time.perf_counter()
        psql("ls", "ANALYZE")
        say(f"ANALYZE on ls in {time.perf_counter() - t0:.1f} s (our seed analyzes its tables too)")
    finally:
        stop_server("ls", proc)
    figures["tasks"] = int(
        psql("ls", f"SELECT count(*) FROM task WHERE project_id = {figures['project_id']}")
    )
    LS_STATE.write_text(
        json.dumps(
            {
                "project_id": figures["project_id"],
                "tasks": figures["tasks"],
                "admin": {"email": LS_ADMIN, "token": tokens[LS_ADMIN]},
                "annotators": [{"username": e, "token": t} for e, t in tokens.items() if e != LS_ADMIN],
            },
            indent=2,
        )
    )
    LS_STATE.chmod(0o600)
    return figures


def rl_seed(args: argparse.Namespace) -> dict[str, Any]:
    say("ours: migrations on database rl")
    RL_VAR.mkdir(parents=True, exist_ok=True)
    env = rl_env()
    t0 = time.perf_counter()
    sh([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO_ROOT, env=env)
    migrate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh(
        [
            sys.executable,
            "bench/annotation_load.py",
            "seed",
            "--comparisons",
            str(args.tasks),
            "--annotators",
            str(args.annotators),
            "--project",
            RL_PROJECT,
            "--reset",
            "--tokens",
            str(RL_TOKENS),
        ],
        cwd=REPO_ROOT,
        env=env,
    )
    seed_s = time.perf_counter() - t0
    stop_rl_redis()
    return {"migrate_s": round(migrate_s, 1), "seed_s": round(seed_s, 1), "comparisons": args.tasks}


def cmd_seed(args: argparse.Namespace) -> int:
    if not 1 <= args.tasks <= MAX_TASKS:
        raise SystemExit(f"--tasks must be between 1 and {MAX_TASKS}")
    if not 1 <= args.annotators <= MAX_ANNOTATORS:
        raise SystemExit(f"--annotators must be between 1 and {MAX_ANNOTATORS}")
    print_machine()
    need_cluster()
    pg_ensure_databases()
    figures: dict[str, Any] = {}
    if not args.skip_ls:
        figures["label_studio"] = ls_seed(args)
    if not args.skip_ours:
        figures["ours"] = rl_seed(args)
    save_results("seed", figures)
    print(json.dumps(figures, indent=2))
    return 0


# --- run -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LsWorkerSpec:
    index: int
    username: str
    token: str
    url: str
    project_id: int
    start_at: float
    warmup_s: float
    duration_s: float
    max_cycles: int
    seed: int
    next_via: (
        str  # "dm": POST /api/dm/actions?id=next_task (the labeling UI); "api": GET /api/projects/{id}/next/
    )


def ls_annotator_loop(spec: LsWorkerSpec, progress: Any) -> WorkerResult:
    """One simulated annotator in Label Studio's label stream: get the next task the way the labeling
    UI does, submit a choice the way the UI does (POST /api/tasks/{id}/annotations/), repeat."""
    rng = random.Random(spec.seed * 1000 + spec.index)
    res = WorkerResult(username=spec.username)
    errors: Counter[str] = Counter()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from simulate.annotators import HttpClient  # the simulated annotators' client: one copy

    client = HttpClient(spec.url, spec.token, timeout=REQUEST_TIMEOUT_S)
    pid = spec.project_id
    next_body: dict[str, Any] | None
    if spec.next_via == "dm":
        next_method, next_path, next_body = "POST", f"/api/dm/actions?id=next_task&project={pid}", {}
    else:
        next_method, next_path, next_body = "GET", f"/api/projects/{pid}/next/", None
    measure_from = spec.start_at + spec.warmup_s
    stop_at = measure_from + spec.duration_s
    delay = spec.start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)

    def fail(key: str) -> None:
        errors[key] += 1
        time.sleep(0.05)

    cycles = empty_in_a_row = 0
    while cycles < spec.max_cycles:
        c0 = time.monotonic()
        if c0 >= stop_at:
            break
        cycles += 1
        measuring = c0 >= measure_from
        try:
            code, task = client.request(next_method, next_path, next_body)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            fail(f"next:{type(exc).__name__}")
            continue
        if measuring:
            res.next_ms.append((time.monotonic() - c0) * 1000)
        if code == 404:
            res.empty_next += 1
            empty_in_a_row += 1
            if empty_in_a_row >= 3:
                res.exhausted = True
                break
            time.sleep(0.2)
            continue
        if code != 200 or not isinstance(task, dict) or "id" not in task:
            fail(f"next:{code}")
            continue
        empty_in_a_row = 0
        payload = {
            "result": [
                {
                    "from_name": "choice",
                    "to_name": "answer_a",
                    "type": "choices",
                    "origin": "manual",
                    "value": {"choices": [rng.choice(CHOICES)]},
                }
            ],
            "lead_time": round(rng.uniform(0.5, 5.0), 3),
            "started_at": datetime.now(UTC).isoformat(),
            "draft_id": 0,
            "parent_prediction": None,
            "parent_annotation": None,
        }
        t1 = time.monotonic()
        try:
            code, _reply = client.request(
                "POST", f"/api/tasks/{task['id']}/annotations/?project={pid}", payload
            )
        except (http.client.HTTPException, OSError, ValueError) as exc:
            fail(f"submit:{type(exc).__name__}")
            continue
        t2 = time.monotonic()
        if code != 201:
            fail(f"submit:{code}")
            continue
        if measuring:
            res.submit_ms.append((t2 - t1) * 1000)
            res.cycle_ms.append((t2 - c0) * 1000)
        res.labels_total += 1
        if measuring and t2 <= stop_at:
            res.labels += 1
        progress[spec.index] = res.labels_total
    client.close()
    res.errors = dict(errors)
    return res


def _ls_worker(spec: LsWorkerSpec, progress: Any, results_q: Any) -> None:
    try:
        results_q.put(ls_annotator_loop(spec, progress))
    except BaseException as exc:  # report, never hang the parent
        results_q.put(WorkerResult(username=spec.username, errors={f"crash:{type(exc).__name__}: {exc}": 1}))


def ls_audit(project_id: int, since: datetime) -> dict[str, Any]:
    """From the database: annotations made, and tasks annotated more often than the project allows."""
    stamp = since.isoformat()
    q = f"SELECT count(*) FROM task_completion WHERE project_id = {project_id}"
    over = (
        "SELECT count(*) FROM (SELECT a.task_id FROM task_completion a JOIN project p ON p.id = a.project_id "
        f"WHERE a.project_id = {project_id} AND NOT a.was_cancelled GROUP BY a.task_id, p.maximum_annotations "
        "HAVING count(*) > p.maximum_annotations) t"
    )
    dup = (
        "SELECT count(*) FROM (SELECT task_id, completed_by_id FROM task_completion "
        f"WHERE project_id = {project_id} GROUP BY task_id, completed_by_id HAVING count(*) > 1) t"
    )
    return {
        "annotations_total": int(psql("ls", q)),
        "annotations_during_run": int(psql("ls", f"{q} AND created_at >= '{stamp}'")),
        "tasks_annotated_beyond_maximum": int(psql("ls", over)),
        "duplicate_annotations_per_annotator": int(psql("ls", dup)),
    }


def run_ls_load(args: argparse.Namespace, state: dict[str, Any], url: str) -> dict[str, Any]:
    people = state["annotators"][: args.annotators]
    if len(people) < args.annotators:
        raise SystemExit(
            f"only {len(people)} LS annotators were seeded; seed again with --annotators {args.annotators}"
        )
    since = datetime.now(UTC)
    start_at = time.monotonic() + 1.0
    specs = [
        LsWorkerSpec(
            index=i,
            username=p["username"],
            token=p["token"],
            url=url,
            project_id=state["project_id"],
            start_at=start_at,
            warmup_s=args.warmup,
            duration_s=args.duration,
            max_cycles=args.max_cycles,
            seed=args.seed,
            next_via=args.next_via,
        )
        for i, p in enumerate(people)
    ]
    total_s = 1.0 + args.warmup + args.duration
    say(
        f"Label Studio: {len(specs)} annotators (processes), {args.warmup:g} s warm-up + {args.duration:g} s measured"
    )
    ctx = mp.get_context("fork")
    progress = ctx.Array("q", len(specs), lock=False)
    results_q = ctx.Queue()
    procs = [ctx.Process(target=_ls_worker, args=(s, progress, results_q), daemon=True) for s in specs]
    for p in procs:
        p.start()
    foreign = ForeignCpu()
    foreign.start()
    _show_progress(progress, total_s)
    foreign_seen = foreign.result()
    results: list[WorkerResult] = []
    deadline = time.monotonic() + total_s + REQUEST_TIMEOUT_S + 30
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(results_q.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results_q.empty():
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    labels = sum(r.labels for r in results)
    report = {
        **foreign_seen,
        "server": args.server,
        "next_endpoint": (
            "POST /api/dm/actions?id=next_task&project={id} (labeling UI)"
            if args.next_via == "dm"
            else "GET /api/projects/{id}/next/"
        ),
        "submit_endpoint": "POST /api/tasks/{id}/annotations/?project={id}",
        "annotators": args.annotators,
        "tasks_seeded": state.get("tasks"),
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "labels": labels,
        "labels_per_s": round(labels / args.duration, 2),
        "exhausted_annotators": sum(r.exhausted for r in results),
        "workers_reported": len(results),
        "latency_ms": {
            "next": _percentiles([v for r in results for v in r.next_ms]),
            "submit": _percentiles([v for r in results for v in r.submit_ms]),
            "cycle": _percentiles([v for r in results for v in r.cycle_ms]),
        },
        "errors": dict(sorted(errors.items())),
        "per_annotator_labels": {r.username: r.labels for r in results},
    }
    try:
        report["audit"] = ls_audit(state["project_id"], since)
    except (subprocess.CalledProcessError, ValueError) as exc:
        report["audit"] = {"error": str(exc)}
    return report


def print_load(name: str, rep: dict[str, Any]) -> None:
    print(f"\n== {name} ==")
    print(f"labels      : {rep['labels']} in {rep['duration_s']:g} s ({rep['labels_per_s']:.1f} labels/s)")
    print(f"{'latency ms':12}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for part, lat in rep["latency_ms"].items():
        cells = "".join(f"{'-' if lat[k] is None else lat[k]:>9}" for k in ("p50", "p90", "p99", "max"))
        print(f"  {part:10}{lat['count']:>8}{cells}")
    errors = rep.get("errors", {})
    print(f"errors      : {sum(errors.values())}" + (f"  {errors}" if errors else ""))
    if rep.get("audit"):
        print(f"audit       : {rep['audit']}")
    if "foreign_cpu_cores_avg" in rep:
        print(
            f"others' CPU : {rep['foreign_cpu_cores_avg']} cores on average during the run {rep['foreign_cpu_top']}"
        )


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    try:
        seeded = json.loads(RL_TOKENS.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{RL_TOKENS} not found: run `seed` first") from None
    port = args.rl_port or free_port()
    proc = start_rl_server(port)
    out = PEER / "rl-run.json"
    out.unlink(missing_ok=True)
    try:
        wait_http(
            f"http://127.0.0.1:{port}/api/projects/{RL_PROJECT}/",
            proc=proc,
            timeout_s=180,
            headers={"Authorization": f"Token {seeded['manager']['token']}"},
        )
        argv = [
            sys.executable,
            "bench/annotation_load.py",
            "run",
            "--url",
            f"http://127.0.0.1:{port}",
            "--project",
            RL_PROJECT,
            "--annotators",
            str(args.annotators),
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--tokens",
            str(RL_TOKENS),
            "--json",
            str(out),
        ] + (["--no-chain"] if args.ours_no_chain else [])
        foreign = ForeignCpu()
        foreign.start()
        sh(argv, cwd=REPO_ROOT, env=rl_env(), check=False)
        foreign_seen = foreign.result()
    finally:
        stop_server("rl", proc)
    if not out.exists():
        raise SystemExit("bench/annotation_load.py run wrote no figures; see its output above")
    rep: dict[str, Any] = json.loads(out.read_text())
    return rep | foreign_seen


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 1)


def cmd_run(args: argparse.Namespace) -> int:
    if not 1 <= args.annotators <= MAX_ANNOTATORS:
        raise SystemExit(f"--annotators must be between 1 and {MAX_ANNOTATORS}")
    if not 0 < args.duration <= MAX_DURATION_S or not 0 <= args.warmup <= MAX_DURATION_S:
        raise SystemExit(f"--duration must be in (0, {MAX_DURATION_S}] and --warmup in [0, {MAX_DURATION_S}]")
    print_machine()
    need_cluster()
    figures: dict[str, Any] = {}
    if not args.skip_ls:
        try:
            state = json.loads(LS_STATE.read_text())
        except FileNotFoundError:
            raise SystemExit(f"{LS_STATE} not found: run `seed` first") from None
        quiet = wait_quiet(args.idle_wait)
        port = args.ls_port or free_port()
        proc = start_ls_server(args.server, port, harakiri=args.harakiri)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(
                f"{url}/api/projects/{state['project_id']}/",
                proc=proc,
                timeout_s=180,
                headers={"Authorization": f"Token {state['admin']['token']}"},
            )
            figures["label_studio"] = run_ls_load(args, state, url) | quiet
        finally:
            stop_server("ls", proc)
        print_load(f"Label Studio ({args.server})", figures["label_studio"])
    if not args.skip_ours:
        quiet = wait_quiet(args.idle_wait)
        figures["ours"] = run_ours(args) | quiet
        print_load("ours (manage.py up)", figures["ours"])
    if "label_studio" in figures and "ours" in figures:
        ls, rl = figures["label_studio"], figures["ours"]
        figures["ratios"] = {
            "labels_per_s_ours_over_ls": _ratio(rl["labels_per_s"], ls["labels_per_s"]),
            "cycle_p50_ls_over_ours": _ratio(
                ls["latency_ms"]["cycle"]["p50"], rl["latency_ms"]["cycle"]["p50"]
            ),
            "cycle_p99_ls_over_ours": _ratio(
                ls["latency_ms"]["cycle"]["p99"], rl["latency_ms"]["cycle"]["p99"]
            ),
        }
        print(f"\nratios      : {figures['ratios']}")
    # One results section per variant, so a side run does not overwrite the main figures.
    section = "run_ours" if args.skip_ls else f"run_{args.server}"
    section += ("_next_api" if args.next_via == "api" and not args.skip_ls else "") + (
        "_ls_only" if args.skip_ours and not args.skip_ls else ""
    )
    save_results(section, figures)
    return 0


# --- export ----------------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """Peak summed RSS of a process tree, sampled every interval (children re-listed each time)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = self.peak_one = 0
        self.stop_event = threading.Event()

    def sample(self) -> int:
        total = 0
        for p in process_tree(self.pid):
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                self.peak_one = max(self.peak_one, rss)
        return total

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, self.sample())
            self.stop_event.wait(self.interval_s)


def timed_download(port: int, path: str, token: str, *, timeout_s: float, pid: int) -> dict[str, Any]:
    baseline = RssSampler(pid).sample()
    sampler = RssSampler(pid)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"path": path}
    try:
        conn.request("GET", path, headers={"Authorization": f"Token {token}"})
        resp = conn.getresponse()
        ttfb = time.perf_counter() - t0
        first_chunk = None
        size = 0
        head = b""
        while True:
            chunk = resp.read(1 << 16)
            if not chunk:
                break
            if first_chunk is None:
                first_chunk = time.perf_counter() - t0
            if len(head) < 200:
                head += chunk[:200]
            size += len(chunk)
        total = time.perf_counter() - t0
        out |= {
            "status": resp.status,
            "ttfb_s": round(ttfb, 3),
            "first_body_byte_s": round(first_chunk, 3) if first_chunk is not None else None,
            "total_s": round(total, 3),
            "bytes": size,
            "content_type": resp.getheader("Content-Type"),
        }
        if resp.status != 200:
            out["body_head"] = head[:200].decode(errors="replace")
    except (http.client.HTTPException, OSError) as exc:
        out |= {"error": f"{type(exc).__name__}: {exc}", "total_s": round(time.perf_counter() - t0, 3)}
    finally:
        conn.close()
        sampler.stop_event.set()
        sampler.join()
    out |= {
        "rss_before_mib": round(baseline / 2**20, 1),
        "rss_peak_mib": round(max(sampler.peak, baseline) / 2**20, 1),
        "rss_peak_one_process_mib": round(sampler.peak_one / 2**20, 1),
    }
    return out


LS_EXPORT_TITLE = "Peer benchmark: export"
RL_EXPORT_PROJECT = "peer-export"
RL_EXPORT_TOKENS = RL_VAR / "export_tokens.json"


def ls_ensure_export_project(url: str, token: str, n: int, chunk: int) -> dict[str, Any]:
    """A project of n tasks each carrying one annotation, imported through the import API (tasks may
    bring their annotations along): the labeled dataset a manager exports, same size as ours."""
    h = {"Authorization": f"Token {token}"}
    r = requests.get(f"{url}/api/projects/", params={"title": LS_EXPORT_TITLE}, headers=h, timeout=60)
    r.raise_for_status()
    found = [p for p in r.json().get("results", []) if p["title"] == LS_EXPORT_TITLE]
    if found:
        pid = found[0]["id"]
    else:
        body = {"title": LS_EXPORT_TITLE, "label_config": LABEL_CONFIG, "maximum_annotations": 1}
        r = requests.post(f"{url}/api/projects/", json=body, headers=h, timeout=60)
        if r.status_code != 201:
            raise SystemExit(f"project create answered {r.status_code}: {r.text[:500]}")
        pid = r.json()["id"]
        say(f"created export project {pid}")
    have = int(psql("ls", f"SELECT count(*) FROM task WHERE project_id = {pid}"))
    rng = random.Random(0)
    figures: dict[str, Any] = {"project_id": pid}
    if have < n:
        say(f"importing {n - have} annotated tasks into project {pid} (import API, {chunk} a request)")
        t0 = time.perf_counter()
        with tqdm(total=n - have, unit="task", unit_scale=True, desc="ls import") as bar:
            for start in range(have, n, chunk):
                batch = [
                    {
                        "data": task_data(i),
                        "annotations": [
                            {
                                "result": [
                                    {
                                        "from_name": "choice",
                                        "to_name": "answer_a",
                                        "type": "choices",
                                        "value": {"choices": [rng.choice(CHOICES)]},
                                    }
                                ],
                                "lead_time": round(rng.uniform(0.5, 5.0), 3),
                            }
                        ],
                    }
                    for i in range(start, min(n, start + chunk))
                ]
                r = requests.post(f"{url}/api/projects/{pid}/import", json=batch, headers=h, timeout=3600)
                if r.status_code not in (200, 201):
                    raise SystemExit(f"import answered {r.status_code}: {r.text[:500]}")
                bar.update(len(batch))
        figures["import_s"] = round(time.perf_counter() - t0, 1)
        psql("ls", "ANALYZE")
    figures |= {
        "tasks": int(psql("ls", f"SELECT count(*) FROM task WHERE project_id = {pid}")),
        "annotations": int(psql("ls", f"SELECT count(*) FROM task_completion WHERE project_id = {pid}")),
    }
    say(f"export project {pid}: {figures}")
    return figures


def cmd_export(args: argparse.Namespace) -> int:
    if not 1 <= args.labeled <= MAX_TASKS:
        raise SystemExit(f"--labeled must be between 1 and {MAX_TASKS}")
    print_machine()
    need_cluster()
    figures: dict[str, Any] = {"labeled": args.labeled}
    if not args.skip_ls:
        figures["label_studio"] = ls_export(args)
    ours_script = REPO_ROOT / "bench" / "export.py"
    if args.skip_ours:
        pass
    elif ours_script.exists():
        figures["ours"] = rl_export(args)
    else:
        msg = "TODO: bench/export.py does not exist yet; rerun `export` once it does for our figures and the ratio"
        say(msg)
        figures["ours"] = {"todo": msg}
    ls_runs = figures.get("label_studio", {}).get("runs", {})
    rl_runs = figures.get("ours", {}).get("runs", [])
    ls_json = ls_runs.get("labeled_json", {})
    rl_jsonl = next((r for r in rl_runs if r.get("format") == "jsonl" and r.get("schema") == "raw"), None)
    if ls_json.get("status") == 200 and rl_jsonl and rl_jsonl.get("seconds"):
        figures["ratios"] = {
            "seconds_ls_over_ours_raw_jsonl": round(ls_json["total_s"] / rl_jsonl["seconds"], 1),
            "first_byte_ls_over_ours": round(ls_json["ttfb_s"] / max(rl_jsonl["first_byte_s"], 1e-3), 1),
            "peak_rss_total_ls_over_ours": round(
                ls_json["rss_peak_mib"] / max(rl_jsonl["server_rss_total_peak_mib"], 1), 1
            ),
        }
        say(f"ratios: {figures['ratios']}")
    save_results("export", figures)
    print(json.dumps(figures, indent=2))
    return 0


def ls_export(args: argparse.Namespace) -> dict[str, Any]:
    try:
        state = json.loads(LS_STATE.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{LS_STATE} not found: run `seed` first") from None
    token = state["admin"]["token"]
    h = {"Authorization": f"Token {token}"}
    port = args.ls_port or free_port()
    proc = start_ls_server(args.server, port, harakiri=args.harakiri)
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {
        "server": args.server,
        "harakiri_s": args.harakiri if args.server == "uwsgi" else None,
    }
    try:
        wait_http(f"{url}/api/projects/", proc=proc, timeout_s=180, headers=h)
        out["export_project"] = ls_ensure_export_project(url, token, args.labeled, args.chunk)
        # Warm every worker's imports so the first export does not pay for them.
        for _ in range(2 * (os.cpu_count() or 1)):
            requests.get(f"{url}/api/projects/", headers=h, timeout=60)
        jobs = [("labeled_json", out["export_project"]["project_id"], "exportType=JSON")]
        if args.all_tasks:
            # The load project: 100k tasks, a few hundred annotated; download_all_tasks takes them all.
            jobs.append(
                ("bench_all_tasks_json", state["project_id"], "exportType=JSON&download_all_tasks=true")
            )
        out |= wait_quiet(args.idle_wait)
        foreign = ForeignCpu()
        foreign.start()
        runs = {}
        for name, pid, query in jobs:
            path = f"/api/projects/{pid}/export?{query}"
            say(f"GET {path} (RSS of the server tree, pid {proc.pid}, sampled every 50 ms)")
            runs[name] = timed_download(port, path, token, timeout_s=args.timeout, pid=proc.pid)
            say(f"  {runs[name]}")
        out["runs"] = runs
        out |= foreign.result()
    finally:
        stop_server("ls", proc)
    return out


def rl_export(args: argparse.Namespace) -> dict[str, Any]:
    """Our side with bench/export.py: a project of the same number of judgments (one per comparison,
    seeded by COPY), served by `manage.py up --no-worker` on database rl, downloaded in each format."""
    env = rl_env()
    try:
        seeded = json.loads(RL_EXPORT_TOKENS.read_text())
    except (FileNotFoundError, ValueError):
        seeded = {}
    if seeded.get("comparisons") != args.labeled:
        sh(
            [
                sys.executable,
                "bench/export.py",
                "seed",
                "--judgments",
                str(args.labeled),
                "--overlap",
                "1",
                "--project",
                RL_EXPORT_PROJECT,
                "--reset",
                "--tokens",
                str(RL_EXPORT_TOKENS),
            ],
            cwd=REPO_ROOT,
            env=env,
        )
    else:
        say(f"our project {RL_EXPORT_PROJECT!r} has {args.labeled} judged comparisons already")
    quiet = wait_quiet(args.idle_wait)
    port = args.rl_port or free_port()
    log = (PEER / "rl-server.log").open("ab")
    argv = [sys.executable, "manage.py", "up", "--port", str(port), "--no-worker"]
    say(f"starting ours: {' '.join(argv)}")
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    PIDFILES["rl"].write_text(str(proc.pid))
    out = PEER / "rl-export.json"
    out.unlink(missing_ok=True)
    try:
        token = json.loads(RL_EXPORT_TOKENS.read_text())["manager"]["token"]
        wait_http(
            f"http://127.0.0.1:{port}/api/projects/{RL_EXPORT_PROJECT}/",
            proc=proc,
            timeout_s=180,
            headers={"Authorization": f"Token {token}"},
        )
        foreign = ForeignCpu()
        foreign.start()
        sh(
            [
                sys.executable,
                "bench/export.py",
                "run",
                "--url",
                f"http://127.0.0.1:{port}",
                "--project",
                RL_EXPORT_PROJECT,
                "--tokens",
                str(RL_EXPORT_TOKENS),
                "--json",
                str(out),
            ],
            cwd=REPO_ROOT,
            env=env,
            check=False,
        )
        foreign_seen = foreign.result()
    finally:
        stop_server("rl", proc)
    if not out.exists():
        return {"error": "bench/export.py run wrote no figures; see its output above"}
    rep: dict[str, Any] = json.loads(out.read_text())
    return rep | quiet | foreign_seen


# --- teardown --------------------------------------------------------------------------------------
def cmd_teardown(args: argparse.Namespace) -> int:
    for name in ("ls", "rl"):
        stop_server(name)
    stop_rl_redis()
    pg_stop()
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(PEER) in cmd:
            left.append(f"{p.info['pid']}: {cmd[:120]}")
    if left:
        say("still running with var/peer in their command line:\n  " + "\n  ".join(left))
        return 1
    say("nothing from var/peer is running")
    return 0


def write_json(path: str, data: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    say(f"figures written to {out}")


# --- command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    def server_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--server", choices=("uwsgi", "runserver"), default="uwsgi", help="how Label Studio is served"
        )
        p.add_argument(
            "--harakiri",
            type=int,
            default=120,
            help="uWSGI per-request limit in seconds (LS ships 120; 0: none)",
        )
        p.add_argument("--ls-port", type=int, default=0, help="Label Studio port (0: a free one)")
        p.add_argument("--skip-ls", action="store_true", help="leave Label Studio out")
        p.add_argument(
            "--idle-wait",
            type=float,
            default=900.0,
            help="wait up to this long for an idle machine first (s)",
        )
        p.add_argument("--skip-ours", action="store_true", help="leave our system out")
        p.add_argument("--json", default="", help="also write all figures so far (results.json) here")

    s = add("setup", cmd_setup, "PostgreSQL cluster, databases, Label Studio venv")
    s.add_argument("--json", default="", help="also write all figures so far (results.json) here")
    s.add_argument("--reinstall", action="store_true", help="pip install into the LS venv even if present")

    s = add("seed", cmd_seed, "Label Studio project + tasks, and our project, of the same size")
    s.add_argument("--tasks", type=int, default=100_000, help="tasks (LS) = comparisons (ours)")
    s.add_argument("--annotators", type=int, default=16, help="annotator accounts on each side")
    s.add_argument("--chunk", type=int, default=IMPORT_CHUNK, help="tasks per LS import request")
    s.add_argument(
        "--reset", action="store_true", help="delete the LS project first (ours is always reseeded)"
    )
    server_opts(s)

    s = add("run", cmd_run, "annotation load on Label Studio, then on ours")
    s.add_argument("--annotators", type=int, default=16, help="N: concurrent annotators")
    s.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    s.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring starts")
    s.add_argument("--max-cycles", type=int, default=1_000_000, help="cap on label cycles per annotator")
    s.add_argument("--seed", type=int, default=0, help="random seed of the simulated choices")
    s.add_argument(
        "--next-via",
        choices=("dm", "api"),
        default="dm",
        help="dm: the labeling UI's next_task action; api: GET /api/projects/{id}/next/",
    )
    s.add_argument("--rl-port", type=int, default=0, help="our port (0: a free one)")
    s.add_argument(
        "--ours-no-chain", action="store_true", help="run ours with --no-chain (GET next + POST per label)"
    )
    server_opts(s)

    s = add("export", cmd_export, "time Label Studio's JSON export, and ours with bench/export.py")
    s.add_argument("--labeled", type=int, default=100_000, help="labeled items exported on each side")
    s.add_argument("--chunk", type=int, default=IMPORT_CHUNK, help="tasks per LS import request")
    s.add_argument("--timeout", type=float, default=900.0, help="client timeout per export request (s)")
    s.add_argument("--all-tasks", action="store_true", help="also export the 100k-task load project")
    s.add_argument("--rl-port", type=int, default=0, help="our port (0: a free one)")
    server_opts(s)

    add("teardown", cmd_teardown, "stop the servers and the cluster")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    PEER.mkdir(parents=True, exist_ok=True)
    code = int(args.func(args))
    if getattr(args, "json", ""):
        write_json(args.json, load_results())
    return code


if __name__ == "__main__":
    sys.exit(main())
