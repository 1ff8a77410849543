"""`manage.py up` as a user runs it: the whole process tree starts on embedded defaults, serves,
runs a real Celery worker, and Ctrl-C stops everything with no orphans; a second `up` works."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(var_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "XDG_RUNTIME_DIR"}}
    env.update({"RL_VAR_DIR": str(var_dir), "PYTHONUNBUFFERED": "1", "RL_WEB_WORKERS": "2"})
    return env


def _tree_processes(var_dir: Path, port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            env = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid == os.getpid():
            continue
        if str(var_dir) in cmd or env.get("RL_VAR_DIR") == str(var_dir) or f":{port}" in cmd:
            found.append(proc)
    return found


def _start(var_dir: Path, port: int, **extra_env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "up", "--port", str(port)],
        cwd=ROOT,
        env={**_env(var_dir), **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if requests.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=10).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("up did not serve within 120 s")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def _cmdline(p: psutil.Process) -> str:
    """The command line, or "" for a process that has just exited (a recycled worker is a zombie
    until the master reaps it: it serves nothing, so it is no worker)."""
    try:
        return " ".join(p.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


def _web_workers(var_dir: Path, port: int) -> set[int]:
    """pids of gunicorn's live worker processes (the master's children)."""
    masters = [p for p in _tree_processes(var_dir, port) if "gunicorn" in _cmdline(p)]
    return {c.pid for m in masters for c in m.children() if "gunicorn" in _cmdline(c)}


def test_up_serves_runs_worker_and_stops_cleanly() -> None:
    var_dir = ROOT / "var" / f"up-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    try:
        # Recycle web workers every 10 requests: they are forked from the master, which imported
        # the app, and each new one must serve database-backed requests on its own connection.
        proc = _start(var_dir, port, GUNICORN_CMD_ARGS="--max-requests 10 --max-requests-jitter 0")
        assert requests.get(f"http://127.0.0.1:{port}/api/schema/", timeout=5).status_code == 200
        first_workers = _web_workers(var_dir, port)
        assert len(first_workers) == 2
        for i in range(60):  # a token lookup in the database, refused: 401 with our error body
            r = requests.get(
                f"http://127.0.0.1:{port}/api/projects/",
                headers={"Authorization": f"Token not-a-token-{i}"},
                timeout=10,
            )
            assert r.status_code == 401, r.text
            assert r.json()["error"]["message"] == "Invalid token.", r.text
        deadline = time.monotonic() + 20
        workers = _web_workers(var_dir, port)
        while time.monotonic() < deadline and (len(workers) != 2 or workers & first_workers):
            time.sleep(0.2)
            workers = _web_workers(var_dir, port)
        assert len(workers) == 2
        assert not workers & first_workers, "no worker was recycled"
        # The real Celery worker answers over the embedded Redis.
        code = (
            "import time; from config.celery import app\n"
            "for _ in range(30):\n"
            "    if app.control.ping(timeout=1): print('pong'); break\n"
            "    time.sleep(1)\n"
        )
        ping = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=_env(var_dir),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert ping.stdout.strip().endswith("pong"), ping.stdout + ping.stderr
        names = {p.name() for p in _tree_processes(var_dir, port)}
        assert "postgres" in names
        assert "redis-server" in names
        out = _stop(proc)
        assert "Rewardloop is up: http://127.0.0.1:" in out
        time.sleep(0.5)
        assert _tree_processes(var_dir, port) == []
        # A second `up` on the same data works, and stops as cleanly.
        proc = _start(var_dir, port)
        _stop(proc)
        time.sleep(0.5)
        assert _tree_processes(var_dir, port) == []
    finally:
        for p in _tree_processes(var_dir, port):
            p.kill()
        shutil.rmtree(var_dir, ignore_errors=True)


def test_an_optional_child_may_end_while_the_rest_runs_on() -> None:
    """A one-off child (the video demo's generator training) ends without stopping the tree; any
    other child's end stops everything."""
    import io

    from annotate.management.commands.up import Command

    err = io.StringIO()
    cmd = Command(stderr=err)
    cmd.children, cmd.optional, cmd.stopping = [], set(), False
    cmd._spawn("one-off", ["true"], optional=True)
    cmd._spawn("server", [sys.executable, "-c", "import time; time.sleep(2)"])
    assert cmd._supervise() == 1  # the server ended (code 0): everything stops
    assert [name for name, _ in cmd.children] == ["server"]
    assert "one-off exited with code 0; the rest runs on" in err.getvalue()
    assert "server exited with code 0; stopping everything" in err.getvalue()
