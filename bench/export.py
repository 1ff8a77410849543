"""Export benchmark (not a test): stream a large preference dataset out of a running server.

    export RL_VAR_DIR=$PWD/var/export-bench
    python bench/export.py seed --judgments 1000000          # 250k comparisons x 4 judgments, by COPY
    python manage.py up --port 8030 --no-worker &
    python bench/export.py run --url http://127.0.0.1:8030

`run` downloads the export in each format over HTTP and reports rows/s, time to first byte and
the peak resident memory of the server's web processes while it streams (sampled with psutil).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import annotation_load as load  # the seed and machine info are shared


def _web_processes() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "gunicorn" in cmd and "config.wsgi" in cmd:
            procs.append(p)
    return procs


class _PeakRss(threading.Thread):
    """Samples the summed RSS of the gunicorn processes every 50 ms; the peak per process too."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_total = 0
        self.peak_one = 0
        self.procs = _web_processes()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in self.procs:
                try:
                    rss = p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                total += rss
                self.peak_one = max(self.peak_one, rss)
            self.peak_total = max(self.peak_total, total)
            time.sleep(0.05)


def _download(url: str, token: str, path: str) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=3600)
    t0 = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Token {token}"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    size = 0
    with tempfile.TemporaryFile() as sink:
        while True:
            chunk = resp.read1(1 << 20)
            if not chunk:
                break
            if first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
            sink.write(chunk)
        total = time.perf_counter() - t0
        conn.close()
        sink.seek(0)  # count rows after the clock stopped, with a real parser for each format
        if "format=parquet" in path:
            import pyarrow.parquet as pq

            lines = pq.ParquetFile(sink).metadata.num_rows
        elif "format=csv" in path:
            lines = sum(1 for _ in csv.reader(io.TextIOWrapper(sink, encoding="utf-8", newline=""))) - 1
        else:
            lines = sum(1 for _ in sink)
    return {"seconds": total, "first_byte_s": first or total, "bytes": size, "rows": lines}


def cmd_seed(args: argparse.Namespace) -> int:
    per = args.overlap
    ns = argparse.Namespace(
        comparisons=args.judgments // per,
        annotators=per,
        overlap=per,
        project=args.project,
        reset=args.reset,
        password="bench-password",
        seed=0,
        tokens=args.tokens,
        judged=True,
    )
    return load.cmd_seed(ns)


def cmd_run(args: argparse.Namespace) -> int:
    tokens = json.loads(Path(args.tokens or load.default_tokens_path()).read_text())
    token = tokens["manager"]["token"]
    report: dict[str, Any] = {"machine": load.machine_info(), "project": args.project, "runs": []}
    print(f"machine: {report['machine']}")
    for fmt, schema, aggregate in [
        ("jsonl", "raw", "none"),
        ("jsonl", "trl", "none"),
        ("parquet", "trl", "none"),
        ("jsonl", "pickapic", "soft"),
        ("csv", "trl", "none"),
    ]:
        path = f"/api/projects/{args.project}/export/?schema={schema}&format={fmt}&aggregate={aggregate}"
        sampler = _PeakRss()
        sampler.start()
        base_rss = sum(p.memory_info().rss for p in sampler.procs)
        res = _download(args.url, token, path)
        sampler.stop.set()
        sampler.join()
        res.update(
            format=fmt,
            schema=schema,
            aggregate=aggregate,
            rows_per_s=res["rows"] / res["seconds"] if res["seconds"] else 0.0,
            server_rss_peak_mib=sampler.peak_one / 2**20,
            server_rss_total_peak_mib=sampler.peak_total / 2**20,
            server_rss_total_before_mib=base_rss / 2**20,
        )
        report["runs"].append(res)
        print(
            f"{schema:9s} {fmt:8s} {aggregate:9s} rows {res['rows']:>9,}  {res['seconds']:7.1f} s  "
            f"{res['rows_per_s']:>9,.0f} rows/s  first byte {res['first_byte_s'] * 1000:6.0f} ms  "
            f"{res['bytes'] / 2**20:8.1f} MiB  peak RSS of the serving process {res['server_rss_peak_mib']:6.0f} MiB"
            f" (all web processes {res['server_rss_total_peak_mib']:.0f} MiB, before {res['server_rss_total_before_mib']:.0f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    seed = sub.add_parser("seed", help="bulk-create a project with N judgments")
    seed.add_argument("--judgments", type=int, default=1_000_000)
    seed.add_argument("--overlap", type=int, default=4, help="judgments per comparison")
    seed.add_argument("--project", default="export-bench")
    seed.add_argument("--reset", action="store_true")
    seed.add_argument("--tokens", default="")
    run = sub.add_parser("run", help="download the export in each format from a running server")
    run.add_argument("--url", default="http://127.0.0.1:8000")
    run.add_argument("--project", default="export-bench")
    run.add_argument("--tokens", default="")
    run.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.cmd == "seed":
        return cmd_seed(args)
    return cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
