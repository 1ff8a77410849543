"""Preference-import throughput (not a test): N TRL rows through the real importer on the embedded
PostgreSQL, rows/s per tenth of the file (flat from the first to the last row?) and peak memory.

    RL_VAR_DIR=/tmp/var_import .venv/bin/python bench/import_load.py --rows 100000
    RL_VAR_DIR=/tmp/var_import .venv/bin/python bench/import_load.py --rows 1000000

Rows look like HH-RLHF: multi-turn conversations with an implicit prompt (chosen and rejected share
the prefix), 2% empty completions, 3% a stock refusal repeated under many prompts. The file is
written to a temporary file first and the import streams it, as the CLI and REST uploads do; the
resident memory of the process is reported at each tenth (flat means the import holds a chunk,
not the file). Each run imports into a new project (``bench-import-<n>-<time>``); use a fresh
``RL_VAR_DIR`` to start from empty tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "question",
    "why",
    "how",
    "what",
    "when",
    "where",
    "help",
    "explain",
    "safe",
    "kind",
    "data",
    "train",
]


def iter_rows(n: int, seed: int = 0) -> Iterator[bytes]:
    """The file's lines, one at a time."""
    rng = random.Random(seed)
    for i in range(n):
        turns = "".join(
            f"\n\nHuman: {' '.join(rng.choices(WORDS, k=rng.randint(5, 30)))} #{i}-{t}"
            f"\n\nAssistant: {' '.join(rng.choices(WORDS, k=rng.randint(5, 40)))}"
            for t in range(rng.randint(0, 2))
        )
        prefix = f"{turns}\n\nHuman: {' '.join(rng.choices(WORDS, k=rng.randint(5, 30)))} #{i}\n\nAssistant: "
        u = rng.random()
        good = (
            "" if u < 0.02 else "I can't help with that." if u < 0.05 else " ".join(rng.choices(WORDS, k=30))
        )
        bad = " ".join(rng.choices(WORDS, k=rng.randint(10, 60))) + f" ({i})"
        yield (json.dumps({"chosen": prefix + good, "rejected": prefix + bad}) + "\n").encode()


def rss_mib() -> float:
    """Resident memory now (not the peak), from /proc."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    import annotation_load
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    print(f"machine: {annotation_load.machine_info()}", flush=True)
    tmp = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False)  # noqa: SIM115 (removed below)
    try:
        with tmp:
            for line in iter_rows(args.rows):
                tmp.write(line)
        size = os.path.getsize(tmp.name)
        print(f"{args.rows:,} rows, {size / 1e6:.0f} MB of JSONL in {tmp.name}", flush=True)
        run(args.rows, Path(tmp.name))
    finally:
        os.unlink(tmp.name)


def run(n: int, path: Path) -> None:
    from django.contrib.auth import get_user_model

    from annotate import imports

    user, _ = get_user_model().objects.get_or_create(
        username="bench-import", defaults={"is_staff": True, "is_superuser": True}
    )
    project = imports.project_for_import(slug=f"bench-import-{n}-{int(time.time())}", actor=user, fmt="trl")
    marks: list[tuple[int, float, float]] = []  # rows done, seconds, RSS MiB
    rss0 = rss_mib()
    start = time.perf_counter()

    def progress(done: int) -> None:
        marks.append((done, time.perf_counter() - start, rss_mib()))

    with open(path, "rb") as fh:
        result = imports.preferences_import(
            project=project, actor=user, fmt="trl", file=fh, progress=progress
        )
    total = time.perf_counter() - start
    rates, rss = [], []
    prev = (0, 0.0, rss0)
    for k in range(1, 11):
        target = n * k // 10
        hi = min(marks, key=lambda m: abs(m[0] - target))
        if hi[1] > prev[1]:
            rates.append((hi[0] - prev[0]) / (hi[1] - prev[1]))
            rss.append(hi[2])
        prev = hi
    print(f"imported {result.comparisons:,} rows ({result.created:,} samples, {result.duplicates:,} reused)")
    print("rows/s per tenth: " + " ".join(f"{r:,.0f}" for r in rates))
    print(f"RSS MiB per tenth (before: {rss0:,.0f}): " + " ".join(f"{r:,.0f}" for r in rss))
    print(
        f"total {total:.1f} s = {n / total:,.0f} rows/s; first tenth {rates[0]:,.0f}, last {rates[-1]:,.0f} "
        f"(last/first {rates[-1] / rates[0]:.2f}); median tenth {statistics.median(rates):,.0f}; "
        f"RSS last/first tenth {rss[-1] / rss[0]:.2f}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
