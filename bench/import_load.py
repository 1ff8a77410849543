"""Preference-import throughput (not a test): N TRL rows through the real importer on the embedded
PostgreSQL, rows/s per tenth of the file (flat from the first to the last row?) and peak memory.

    RL_VAR_DIR=/tmp/var_import .venv/bin/python bench/import_load.py --rows 100000
    RL_VAR_DIR=/tmp/var_import .venv/bin/python bench/import_load.py --rows 1000000

Rows look like HH-RLHF: multi-turn conversations with an implicit prompt (chosen and rejected share
the prefix), 2% empty completions, 3% a stock refusal repeated under many prompts. Each run imports
into a fresh project (``bench-import-<n>``, deleted first).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import sys
import time
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


def rows(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    out = []
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
        out.append(json.dumps({"chosen": prefix + good, "rejected": prefix + bad}))
    return ("\n".join(out) + "\n").encode()


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
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from annotate import imports
    from annotate.models import Project

    call_command("migrate", verbosity=0)
    print(f"machine: {annotation_load.machine_info()}", flush=True)
    data = rows(args.rows)
    print(f"{args.rows:,} rows, {len(data) / 1e6:.0f} MB of JSONL", flush=True)
    user, _ = get_user_model().objects.get_or_create(
        username="bench-import", defaults={"is_staff": True, "is_superuser": True}
    )
    slug = f"bench-import-{args.rows}"
    Project.objects.filter(slug=slug).delete()
    project = imports.project_for_import(slug=slug, actor=user, fmt="trl")
    marks: list[tuple[int, float]] = []
    start = time.perf_counter()

    def progress(n: int) -> None:
        marks.append((n, time.perf_counter() - start))

    result = imports.preferences_import(
        project=project, actor=user, fmt="trl", file=io.BytesIO(data), progress=progress
    )
    total = time.perf_counter() - start
    rates = []
    for k in range(1, 11):
        lo_n, hi_n = args.rows * (k - 1) // 10, args.rows * k // 10
        lo = min(marks, key=lambda m: abs(m[0] - lo_n)) if k > 1 else (0, 0.0)
        hi = min(marks, key=lambda m: abs(m[0] - hi_n))
        if hi[1] > lo[1]:
            rates.append((hi[0] - lo[0]) / (hi[1] - lo[1]))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"imported {result.comparisons:,} rows ({result.created:,} samples, {result.duplicates:,} reused)")
    print("rows/s per tenth: " + " ".join(f"{r:,.0f}" for r in rates))
    print(
        f"total {total:.1f} s = {args.rows / total:,.0f} rows/s; first tenth {rates[0]:,.0f}, last {rates[-1]:,.0f} "
        f"(last/first {rates[-1] / rates[0]:.2f}); median tenth {statistics.median(rates):,.0f}; "
        f"peak RSS {peak_mib:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
