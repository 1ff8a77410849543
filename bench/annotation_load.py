"""Annotation load benchmark: many annotators labeling at once through the REST API.

Not a test. Two steps, against a server that is already running on this machine:

    python bench/annotation_load.py seed --comparisons 100000 --annotators 16 --project bench --reset
    python bench/annotation_load.py run --annotators 16 --duration 60 --warmup 5 --json var/bench.json

``seed`` writes the project straight into the database (bulk inserts, no HTTP) and the annotators'
API tokens to ``var/bench_tokens.json``. ``run`` starts one process per annotator; each loops
``GET next`` then ``POST judgments?next=1`` (whose response carries the following lease) with no
think time, measures latencies, and at the end audits the database: no comparison may have been
handed out more often than its overlap, and no annotator may have judged one comparison twice.

The load generator shares the CPU with the server, so it stays lean: plain ``requests`` sessions
with keep-alive, numbers kept in lists, everything else after the clock stops.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import requests
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
BATCH = 5000
# Upper bounds that keep a mistyped command from running away.
MAX_COMPARISONS = 5_000_000
MAX_ANNOTATORS = 256
MAX_DURATION_S = 3600.0
REQUEST_TIMEOUT_S = 15.0


def setup_django() -> None:
    """Import Django with the project's settings (same environment as the server: same database)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from config.migrate import ensure_migrated

    ensure_migrated()


def default_tokens_path() -> Path:
    var = os.environ.get("RL_VAR_DIR") or str(REPO_ROOT / "var")
    return Path(var) / "bench_tokens.json"


# --- seed ----------------------------------------------------------------------------------------
_ANSWER_BODIES = (
    "A hash map resolves collisions by chaining entries in a bucket or by probing for a free slot.\n\n"
    "1. **Chaining** keeps a short list per bucket.\n2. **Open addressing** probes other slots.\n"
    "3. **Resizing** past a load factor keeps chains short.\n",
    "Normalise the string and compare it with its reverse:\n\n```python\n"
    "def is_palindrome(s):\n    t = [c.casefold() for c in s if c.isalnum()]\n    return t == t[::-1]\n```\n",
    "Great question!! So basically it depends, but generally speaking, kind of, the answer is that "
    "you should think about it carefully, and as I said before, it depends.\n\nHope this helps!!\n",
    "Air molecules scatter short wavelengths more strongly (Rayleigh scattering), so blue light "
    "reaches you from every direction of the sky. At sunset the blue is scattered away.\n",
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _reset_project(slug: str) -> int:
    """Delete the project and everything in it. The big tables go by plain SQL, children first (the
    ORM's cascade would load every row into memory); the ORM then deletes the project itself, which
    cascades to whatever else (members, rows of other apps) still points at it."""
    from django.db import connection, transaction

    from annotate.models import Assignment, Comparison, ComparisonSample, Judgment, Project, Prompt, Sample

    project = Project.objects.filter(slug=slug).first()
    if project is None:
        return 0
    q = connection.ops.quote_name
    comparisons = q(Comparison._meta.db_table)
    deleted = 0
    with transaction.atomic():
        with connection.cursor() as cur:
            for table in (Judgment._meta.db_table, Assignment._meta.db_table):
                cur.execute(f"DELETE FROM {q(table)} WHERE project_id = %s", [project.id])
                deleted += cur.rowcount
            cur.execute(
                f"DELETE FROM {q(ComparisonSample._meta.db_table)} WHERE comparison_id IN "
                f"(SELECT id FROM {comparisons} WHERE project_id = %s)",
                [project.id],
            )
            deleted += cur.rowcount
            for table in (Comparison._meta.db_table, Sample._meta.db_table, Prompt._meta.db_table):
                cur.execute(f"DELETE FROM {q(table)} WHERE project_id = %s", [project.id])
                deleted += cur.rowcount
        n, _ = Project.objects.filter(pk=project.pk).delete()
    # Now, before the seed: a VACUUM of the dead rows while the seed's own are still uncommitted
    # would record the tables as empty (annotate/bulk.py, bulk_load_settings).
    with connection.cursor() as cur:
        for model in (Judgment, Assignment, ComparisonSample, Comparison, Sample, Prompt):
            cur.execute(f"VACUUM (ANALYZE) {q(model._meta.db_table)}")
    return deleted + n


def _user(username: str, *, password_hash: str, staff: bool = False) -> Any:
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(
        username=username, defaults={"password": password_hash, "is_staff": staff}
    )
    if not created and staff and not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    return user


def cmd_seed(args: argparse.Namespace) -> int:
    if not 1 <= args.comparisons <= MAX_COMPARISONS:
        raise SystemExit(f"--comparisons must be between 1 and {MAX_COMPARISONS}")
    if not 1 <= args.annotators <= MAX_ANNOTATORS:
        raise SystemExit(f"--annotators must be between 1 and {MAX_ANNOTATORS}")
    setup_django()
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import Group
    from django.db import DatabaseError, connection, transaction
    from django.utils import timezone
    from rest_framework.authtoken.models import Token

    from annotate.bulk import TableCopier, bulk_load_settings, reserve_ids
    from annotate.models import (
        Comparison,
        ComparisonSample,
        Generator,
        GeneratorVersion,
        Judgment,
        Modality,
        Project,
        ProjectMember,
        Prompt,
        Sample,
    )

    t0 = time.perf_counter()
    if args.reset:
        n = _reset_project(args.project)
        print(f"reset: deleted {n} rows of project {args.project!r} in {time.perf_counter() - t0:.1f} s")
    elif Project.objects.filter(slug=args.project).exists():
        raise SystemExit(f"project {args.project!r} exists; pass --reset to recreate it")

    # One hash for every bench user: PBKDF2 is deliberately slow, and these are throwaway accounts.
    password_hash = make_password(args.password)
    m = args.comparisons
    rng = random.Random(args.seed)
    with transaction.atomic():
        admin = _user("bench-admin", password_hash=password_hash, staff=True)
        annotators = [_user(f"bench-{i}", password_hash=password_hash) for i in range(1, args.annotators + 1)]
        project = Project.objects.create(
            slug=args.project,
            name=f"Load benchmark ({m} comparisons)",
            modality=Modality.TEXT,
            instructions="Benchmark project: pick the better answer.",
            allow_tie=True,
            allow_both_bad=True,
            mode=Project.Mode.PAIRWISE,
            k=2,
            overlap=args.overlap,
            created_by=admin,
        )
        ProjectMember.objects.bulk_create(
            [ProjectMember(project=project, user=admin, role=ProjectMember.Role.MANAGER)]
            + [ProjectMember(project=project, user=u, role=ProjectMember.Role.ANNOTATOR) for u in annotators]
        )
        # The load's annotators submit source=simulated with their tokens: only members of this
        # group may (docs/API.md).
        simulated, _ = Group.objects.get_or_create(name=Judgment.SIMULATED_GROUP)
        simulated.user_set.add(*annotators)
        versions = []
        for name in ("bench-a", "bench-b"):
            gen, _ = Generator.objects.get_or_create(name=name, defaults={"description": "load benchmark"})
            gv, _ = GeneratorVersion.objects.get_or_create(generator=gen, name="v1")
            versions.append(gv)

        total_rows = m * 6  # prompts, 2 samples, comparisons, 2 comparison-sample rows per comparison
        if getattr(args, "judged", False):
            total_rows += m * args.overlap
        now = timezone.now()
        pid, gva, gvb = project.id, versions[0].id, versions[1].id
        prompt_rows = TableCopier(Prompt, ["id", "project_id", "text", "text_hash"], now=now)
        sample_rows = TableCopier(
            Sample,
            [
                "id",
                "project_id",
                "prompt_id",
                "generator_version_id",
                "modality",
                "mime_type",
                "text",
                "content_hash",
                "byte_size",
            ],
            now=now,
        )
        judged = bool(getattr(args, "judged", False))
        comparison_rows = TableCopier(
            Comparison,
            ["id", "project_id", "prompt_id", "priority", "origin", "overlap"]
            + (["slots_taken", "judgments_count", "status"] if judged else []),
            now=now,
        )
        judgment_rows = TableCopier(
            Judgment,
            [
                "id",
                "project_id",
                "comparison_id",
                "annotator_id",
                "outcome",
                "winner_id",
                "displayed_order",
                "time_spent_ms",
                "source",
            ],
            now=now,
        )
        entry_rows = TableCopier(
            ComparisonSample, ["id", "comparison_id", "sample_id", "prompt_id", "position"], now=now
        )
        connection.ensure_connection()
        t_copy = time.perf_counter()
        cur = connection.connection.cursor()  # the raw psycopg cursor, for COPY; same transaction
        # Foreign keys checked per COPY (parents first), and no VACUUM mid-load: after --reset one
        # would record the tables as empty and wreck the checks' plans (annotate/bulk.py).
        bulk_load_settings(cur, [Prompt, Sample, Comparison, ComparisonSample, Judgment])
        with tqdm(total=total_rows, unit="row", unit_scale=True, desc="seed", smoothing=0.1) as bar:
            for start in range(0, m, BATCH):
                idx = range(start, min(m, start + BATCH))
                n = len(idx)
                prompt_ids = reserve_ids(cur, Prompt, n)
                prompts = []
                for i, prompt_id in zip(idx, prompt_ids, strict=True):
                    text = f"Bench prompt #{i}: explain topic {i % 97} to a new colleague."
                    prompts.append((prompt_id, pid, text, _sha256(text)))
                prompt_rows.copy(cur, prompts)
                bar.update(n)

                sample_ids = reserve_ids(cur, Sample, 2 * n)
                samples: list[tuple[Any, ...]] = []
                for j, i in enumerate(idx):
                    for variant, version_id in (("a", gva), ("b", gvb)):
                        body = _ANSWER_BODIES[(i * 2 + (variant == "b")) % len(_ANSWER_BODIES)]
                        text = f"Answer {variant.upper()} to prompt #{i}.\n\n{body}"
                        sid = sample_ids[len(samples)]
                        samples.append(
                            (
                                sid,
                                pid,
                                prompt_ids[j],
                                version_id,
                                Modality.TEXT.value,
                                "text/markdown",
                                text,
                                _sha256(text),
                                len(text.encode()),
                            )
                        )
                sample_rows.copy(cur, samples)
                bar.update(2 * n)

                comparison_ids = reserve_ids(cur, Comparison, n)
                comparison_rows.copy(
                    cur,
                    [
                        (
                            cid,
                            pid,
                            prompt_id,
                            round(rng.random(), 6),
                            Comparison.Origin.RANDOM.value,
                            args.overlap,
                        )
                        + ((args.overlap, args.overlap, Comparison.Status.COMPLETE.value) if judged else ())
                        for cid, prompt_id in zip(comparison_ids, prompt_ids, strict=True)
                    ],
                )
                bar.update(n)

                entry_ids = iter(reserve_ids(cur, ComparisonSample, 2 * n))
                entries = []
                for j, (cid, prompt_id) in enumerate(zip(comparison_ids, prompt_ids, strict=True)):
                    pair = [samples[2 * j][0], samples[2 * j + 1][0]]
                    if rng.random() < 0.5:
                        pair.reverse()
                    entries += [(next(entry_ids), cid, sid, prompt_id, pos) for pos, sid in enumerate(pair)]
                entry_rows.copy(cur, entries)
                bar.update(2 * n)
                if judged:
                    # Every comparison fully judged by the first `overlap` annotators (export benchmark).
                    judgment_ids = iter(reserve_ids(cur, Judgment, n * args.overlap))
                    rows = []
                    for j, cid in enumerate(comparison_ids):
                        pair = [entries[2 * j][2], entries[2 * j + 1][2]]
                        for a in annotators[: args.overlap]:
                            pick = rng.random()
                            outcome = "a" if pick < 0.45 else "b" if pick < 0.9 else "tie"
                            winner = pair[0] if outcome == "a" else pair[1] if outcome == "b" else None
                            shown = pair if rng.random() < 0.5 else pair[::-1]
                            rows.append(
                                (
                                    next(judgment_ids),
                                    pid,
                                    cid,
                                    a.id,
                                    outcome,
                                    winner,
                                    json.dumps(shown),
                                    rng.randint(500, 9000),
                                    "simulated",
                                )
                            )
                    judgment_rows.copy(cur, rows)
                    bar.update(len(rows))
                copiers = [prompt_rows, sample_rows, comparison_rows, entry_rows] + (
                    [judgment_rows] if judged else []
                )
                bar.set_postfix_str(
                    " ".join(
                        f"{c.table.removeprefix('annotate_')}={c.chunk_rates[-1]:,.0f}/s" for c in copiers
                    ),
                    refresh=False,
                )
            cur.close()
        copied = time.perf_counter()

        tokens = {}
        for u in [admin, *annotators]:
            token, _ = Token.objects.get_or_create(user=u)
            tokens[u.username] = token.key
    committed = time.perf_counter()
    # Fresh statistics, or the planner may not use the open-queue index on the first requests.
    # VACUUM too: a bulk-loaded table has no hint bits or visibility map yet, so the first run
    # would pay for writing them back; a database that has been serving for a while has not.
    with connection.cursor() as cur:
        for model in (Prompt, Sample, Comparison, ComparisonSample, ProjectMember, Judgment):
            cur.execute(f"VACUUM (ANALYZE) {connection.ops.quote_name(model._meta.db_table)}")
        # And a checkpoint: otherwise the load's WAL starts one that runs through the first minutes
        # of measuring, when every page first touched writes a full image to WAL (15-20% fewer
        # labels/s until it ends). Timed checkpoints still come every checkpoint_timeout, as in
        # production. It needs the pg_checkpoint role on an external server.
        try:
            cur.execute("CHECKPOINT")
        except DatabaseError as exc:
            print(f"no CHECKPOINT after seeding ({exc}); the first run may be slower", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    analyzed = time.perf_counter() - committed
    print(f"copy {copied - t_copy:.1f} s, commit {committed - copied:.1f} s, VACUUM ANALYZE {analyzed:.1f} s")

    out = Path(args.tokens) if args.tokens else default_tokens_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "project": args.project,
        "comparisons": m,
        "overlap": args.overlap,
        "seeded_at": datetime.now(UTC).isoformat(),
        "manager": {"username": admin.username, "token": tokens[admin.username]},
        "annotators": [{"username": u.username, "token": tokens[u.username]} for u in annotators],
    }
    out.write_text(json.dumps(payload, indent=2))
    out.chmod(0o600)
    print(
        f"seeded project {args.project!r}: {m} comparisons, {2 * m} samples, {len(annotators)} annotators "
        f"in {elapsed:.1f} s ({total_rows / elapsed:,.0f} rows/s); tokens in {out}"
    )
    return 0


# --- run -----------------------------------------------------------------------------------------
@dataclass
class WorkerResult:
    username: str
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    labels: int = 0  # judgments created (201) inside the measured window
    labels_total: int = 0  # including warm-up
    replays: int = 0  # 200: an idempotent replay; never expected with fresh keys
    empty_next: int = 0
    exhausted: bool = False
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    username: str
    token: str
    url: str
    project: str
    start_at: float  # time.monotonic() value (system-wide clock) at which everyone starts
    warmup_s: float
    duration_s: float
    max_cycles: int
    think_ms: float
    seed: int
    chain: bool = True  # submit with ?next=1 and label the lease the response carries


def annotator_loop(spec: WorkerSpec, progress: Any) -> WorkerResult:
    """One simulated annotator: fetch a lease, judge it at random, use the lease the response
    carries next (``chain``) or fetch again. Latencies count only for requests that start inside the
    measured window, except chained runs' rare ``GET next`` calls, which all count."""
    rng = random.Random(spec.seed * 1000 + spec.index)
    res = WorkerResult(username=spec.username)
    errors: Counter[str] = Counter()
    base = f"/api/projects/{spec.project}"
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from simulate.annotators import HttpClient  # the simulated annotators' client: one copy

    client = HttpClient(spec.url, spec.token, timeout=REQUEST_TIMEOUT_S)
    options = ["left", "right"]
    pending: list[dict[str, Any]] = []
    measure_from = spec.start_at + spec.warmup_s
    stop_at = measure_from + spec.duration_s
    delay = spec.start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)

    def fail(key: str) -> None:
        errors[key] += 1
        time.sleep(0.05)  # do not spin on a failing server

    cycles = empty_in_a_row = 0
    while cycles < spec.max_cycles:
        c0 = time.monotonic()
        if c0 >= stop_at:
            break
        cycles += 1
        measuring = c0 >= measure_from
        if not pending:
            try:
                code, body = client.request("GET", f"{base}/next/?n=1")
            except (http.client.HTTPException, OSError) as exc:
                fail(f"next:{type(exc).__name__}")
                continue
            if measuring or spec.chain:
                res.next_ms.append((time.monotonic() - c0) * 1000)
            if code != 200:
                fail(f"next:{code}")
                continue
            pending = body.get("items", [])
            opts = body.get("options", {})
            options = ["left", "right"] + [k for k in ("tie", "both_bad") if opts.get(k)]
            if not pending:
                res.empty_next += 1
                empty_in_a_row += 1
                if empty_in_a_row >= 3:
                    res.exhausted = True  # nothing left to label for me
                    break
                time.sleep(0.2)
                continue
            empty_in_a_row = 0
        item = pending.pop(0)
        if spec.think_ms:
            time.sleep(rng.expovariate(1.0 / spec.think_ms) / 1000)
        payload = {
            "assignment": item["assignment"],
            "choice": rng.choice(options),
            "time_spent_ms": rng.randint(500, 5000),
            "idempotency_key": uuid.uuid4().hex,
            "source": "simulated",
        }
        t1 = time.monotonic()
        try:
            code, reply = client.request(
                "POST", f"{base}/judgments/" + ("?next=1" if spec.chain else ""), payload
            )
        except (http.client.HTTPException, OSError) as exc:
            fail(f"submit:{type(exc).__name__}")
            continue
        t2 = time.monotonic()
        if code not in (200, 201):
            fail(f"submit:{code}")
            continue
        if measuring:
            res.submit_ms.append((t2 - t1) * 1000)
            res.cycle_ms.append((t2 - c0) * 1000)
        if code == 201:
            res.labels_total += 1
            if measuring and t2 <= stop_at:
                res.labels += 1
            progress[spec.index] = res.labels_total
        else:
            res.replays += 1
        if spec.chain:
            pending = (reply.get("next") or {}).get("items", [])
    client.close()
    res.errors = dict(errors)
    return res


def _run_worker(spec: WorkerSpec, progress: Any, results_q: Any) -> None:
    try:
        results_q.put(annotator_loop(spec, progress))
    except BaseException as exc:  # report, never hang the parent
        results_q.put(WorkerResult(username=spec.username, errors={f"crash:{type(exc).__name__}: {exc}": 1}))


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    mem_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "count": int(arr.size),
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "p99": round(float(p99), 2),
        "max": round(float(arr.max()), 2),
    }


def audit(project_slug: str, since: datetime) -> dict[str, Any]:
    """Count, from the database, every way a slot could have been handed out twice."""
    setup_django()
    from django.db.models import Count, F, Q

    from annotate.models import Assignment, Comparison, Judgment, Project

    project = Project.objects.get(slug=project_slug)
    live = [Assignment.Status.ACTIVE, Assignment.Status.DONE]
    comparisons = Comparison.objects.filter(project=project)
    over_assigned = (
        comparisons.annotate(n=Count("assignments", filter=Q(assignments__status__in=live)))
        .filter(n__gt=F("overlap"))
        .count()
    )
    over_judged = comparisons.annotate(n=Count("judgments")).filter(n__gt=F("overlap")).count()
    duplicate_judgments = (
        Judgment.objects.filter(project=project)
        .values("comparison", "annotator")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    duplicate_assignments = (
        Assignment.objects.filter(project=project)
        .values("comparison", "annotator")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    # The denormalised counters that `next` relies on must match the rows they count.
    slot_counter_mismatch = (
        comparisons.annotate(n=Count("assignments", filter=Q(assignments__status__in=live)))
        .exclude(slots_taken=F("n"))
        .count()
    )
    judgment_counter_mismatch = (
        comparisons.annotate(n=Count("judgments")).exclude(judgments_count=F("n")).count()
    )
    return {
        "comparisons": comparisons.count(),
        "overlap": project.overlap,
        "judgments_total": Judgment.objects.filter(project=project).count(),
        "judgments_during_run": Judgment.objects.filter(project=project, created_at__gte=since).count(),
        "comparisons_assigned_beyond_overlap": over_assigned,
        "comparisons_judged_beyond_overlap": over_judged,
        "duplicate_judgments_per_annotator": duplicate_judgments,
        "duplicate_assignments_per_annotator": duplicate_assignments,
        "slots_taken_counter_mismatches": slot_counter_mismatch,
        "judgments_count_counter_mismatches": judgment_counter_mismatch,
    }


def cmd_run(args: argparse.Namespace) -> int:
    host = urlparse(args.url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing to load-test {args.url}: only this machine (127.0.0.1) is allowed")
    if not 1 <= args.annotators <= MAX_ANNOTATORS:
        raise SystemExit(f"--annotators must be between 1 and {MAX_ANNOTATORS}")
    if not 0 < args.duration <= MAX_DURATION_S or not 0 <= args.warmup <= MAX_DURATION_S:
        raise SystemExit(f"--duration must be in (0, {MAX_DURATION_S}] and --warmup in [0, {MAX_DURATION_S}]")
    tokens_path = Path(args.tokens) if args.tokens else default_tokens_path()
    try:
        seeded = json.loads(tokens_path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{tokens_path} not found: run `seed` first") from None
    if seeded.get("project") != args.project:
        raise SystemExit(f"{tokens_path} is for project {seeded.get('project')!r}, not {args.project!r}")
    people = seeded["annotators"][: args.annotators]
    if len(people) < args.annotators:
        raise SystemExit(
            f"only {len(people)} annotators were seeded; seed again with --annotators {args.annotators}"
        )

    url = args.url.rstrip("/")
    try:  # fail fast, before forking anything, when the server is not up or the token is wrong
        probe = requests.get(
            f"{url}/api/projects/{args.project}/",
            headers={"Authorization": f"Token {people[0]['token']}"},
            timeout=10,
        )
    except requests.RequestException as exc:
        raise SystemExit(f"server at {url} not reachable: {exc}") from None
    if probe.status_code != 200:
        raise SystemExit(
            f"GET /api/projects/{args.project}/ answered {probe.status_code}: {probe.text[:300]}"
        )

    since = datetime.now(UTC)
    start_at = time.monotonic() + 1.0  # time for every process to start before the clock runs
    specs = [
        WorkerSpec(
            index=i,
            username=p["username"],
            token=p["token"],
            url=url,
            project=args.project,
            start_at=start_at,
            warmup_s=args.warmup,
            duration_s=args.duration,
            max_cycles=args.max_cycles,
            think_ms=args.think_ms,
            seed=args.seed,
            chain=not args.no_chain,
        )
        for i, p in enumerate(people)
    ]
    total_s = 1.0 + args.warmup + args.duration
    print(
        f"{len(specs)} annotators ({'threads' if args.threads else 'processes'}) against {url}, "
        f"project {args.project!r}: {args.warmup:g} s warm-up + {args.duration:g} s measured"
    )

    results: list[WorkerResult] = []
    if args.threads:
        progress: Any = [0] * len(specs)
        with ThreadPoolExecutor(max_workers=len(specs)) as pool:
            futures = [pool.submit(annotator_loop, s, progress) for s in specs]
            _show_progress(progress, total_s)
            results = [f.result() for f in futures]
    else:
        ctx = mp.get_context("fork")
        progress = ctx.Array("q", len(specs), lock=False)
        results_q = ctx.Queue()
        procs = [ctx.Process(target=_run_worker, args=(s, progress, results_q), daemon=True) for s in specs]
        for p in procs:
            p.start()
        _show_progress(progress, total_s)
        deadline = time.monotonic() + total_s + REQUEST_TIMEOUT_S + 30
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(results_q.get(timeout=1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results_q.empty():
                    break
        for p in procs:
            p.join(timeout=5)
        if len(results) < len(procs):
            print(f"warning: only {len(results)} of {len(procs)} workers reported", file=sys.stderr)

    report = summarize(args, seeded, results)
    if not args.no_audit:
        try:
            report["audit"] = audit(args.project, since)
        except Exception as exc:  # a failed audit should not eat the latency figures
            report["audit"] = {"error": f"{type(exc).__name__}: {exc}"}
    print_report(report)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"figures written to {out}")
    failed = report.get("audit", {})
    bad = sum(v for k, v in failed.items() if k.endswith(("overlap", "per_annotator")) and isinstance(v, int))
    return 1 if bad else 0


def _show_progress(progress: Any, total_s: float) -> None:
    """A time bar with the running label count, until the workers' clock runs out."""
    start = time.monotonic()
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}"
    with tqdm(total=round(total_s), unit="s", desc="run", bar_format=fmt) as bar:
        while True:
            time.sleep(0.5)
            elapsed = min(total_s, time.monotonic() - start)
            bar.n = round(elapsed)
            bar.set_postfix_str(f"labels={sum(progress[i] for i in range(len(progress)))}", refresh=False)
            bar.refresh()
            if elapsed >= total_s:
                return


def summarize(
    args: argparse.Namespace, seeded: dict[str, Any], results: list[WorkerResult]
) -> dict[str, Any]:
    next_ms = [v for r in results for v in r.next_ms]
    submit_ms = [v for r in results for v in r.submit_ms]
    cycle_ms = [v for r in results for v in r.cycle_ms]
    labels = sum(r.labels for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    return {
        "benchmark": "annotation_load",
        "when": datetime.now(UTC).isoformat(),
        "machine": machine_info(),
        "url": args.url,
        "project": args.project,
        "client": "threads" if args.threads else "processes",
        "annotators": args.annotators,
        "comparisons_seeded": seeded.get("comparisons"),
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "think_ms": args.think_ms,
        "chained_next": not args.no_chain,
        "labels": labels,
        "labels_incl_warmup": sum(r.labels_total for r in results),
        "labels_per_s": round(labels / args.duration, 2),
        "idempotent_replays": sum(r.replays for r in results),
        "exhausted_annotators": sum(r.exhausted for r in results),
        "workers_reported": len(results),
        "latency_ms": {
            "next": _percentiles(next_ms),
            "submit": _percentiles(submit_ms),
            "cycle": _percentiles(cycle_ms),
        },
        "errors": dict(sorted(errors.items())),
        "per_annotator_labels": {r.username: r.labels for r in results},
    }


def print_report(rep: dict[str, Any]) -> None:
    m = rep["machine"]
    print()
    print("== annotation load benchmark ==")
    print(f"machine     : {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}")
    flow = "GET next only when ?next=1 returned none" if rep["chained_next"] else "GET next for every label"
    who = f"{rep['annotators']} annotators as {rep['client']}"
    print(f"client      : {who}, think {rep['think_ms']:g} ms, {flow}")
    audit_m = rep.get("audit", {}).get("comparisons")
    print(f"comparisons : {audit_m if audit_m is not None else rep['comparisons_seeded']} (M)")
    print(f"duration    : {rep['duration_s']:g} s measured after {rep['warmup_s']:g} s warm-up")
    print(f"labels      : {rep['labels']} ({rep['labels_per_s']:.1f} labels/s)")
    print(f"{'latency ms':12}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for name, lat in rep["latency_ms"].items():
        cells = "".join(f"{'-' if lat[k] is None else lat[k]:>9}" for k in ("p50", "p90", "p99", "max"))
        note = "  (every call, warm-up included)" if name == "next" and rep["chained_next"] else ""
        print(f"  {name:10}{lat['count']:>8}{cells}{note}")
    errors = rep["errors"]
    print(f"errors      : {sum(errors.values())}" + (f"  {errors}" if errors else ""))
    if rep["exhausted_annotators"]:
        print(
            f"exhausted   : {rep['exhausted_annotators']} annotators ran out of work (seed more comparisons)"
        )
    audit_r = rep.get("audit")
    if audit_r is None:
        print("audit       : skipped (--no-audit)")
    elif "error" in audit_r:
        print(f"audit       : failed: {audit_r['error']}")
    else:
        twice = audit_r["comparisons_assigned_beyond_overlap"]
        print(
            f"slots handed out twice : {twice} comparisons with more active+done leases than overlap "
            f"({audit_r['overlap']})"
        )
        print(f"judged beyond overlap  : {audit_r['comparisons_judged_beyond_overlap']}")
        print(
            f"duplicate judgments    : {audit_r['duplicate_judgments_per_annotator']} (comparison, "
            f"annotator) pairs; duplicate leases: {audit_r['duplicate_assignments_per_annotator']}"
        )
        print(
            f"counter mismatches     : slots_taken {audit_r['slots_taken_counter_mismatches']}, "
            f"judgments_count {audit_r['judgments_count_counter_mismatches']}"
        )
        print(
            f"judgments in database  : {audit_r['judgments_during_run']} during the run "
            f"(client counted {rep['labels_incl_warmup']}), {audit_r['judgments_total']} in all"
        )


# --- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    seed = sub.add_parser(
        "seed",
        help="bulk-create the benchmark project in the database",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    seed.add_argument("--comparisons", type=int, default=100_000, help="M: comparisons (one prompt each)")
    seed.add_argument("--annotators", type=int, default=16, help="annotator accounts bench-1..bench-N")
    seed.add_argument("--project", default="bench", help="project slug")
    seed.add_argument("--overlap", type=int, default=1, help="judgments wanted per comparison")
    seed.add_argument("--reset", action="store_true", help="delete the project's rows first")
    seed.add_argument(
        "--judged",
        action="store_true",
        help="every comparison complete, judged by annotators 1..overlap (stored history, not open work)",
    )
    seed.add_argument(
        "--password", default="bench-password", help="password of every bench account (UI login)"
    )
    seed.add_argument(
        "--tokens", default="", help="where to write the tokens (default: var/bench_tokens.json)"
    )
    seed.add_argument("--seed", type=int, default=0, help="random seed (priorities, left/right order)")
    seed.set_defaults(func=cmd_seed)

    run = sub.add_parser(
        "run",
        help="label through the API from N annotators at once",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (this machine only)")
    run.add_argument("--project", default="bench", help="project slug")
    run.add_argument("--annotators", type=int, default=16, help="N: concurrent annotators")
    run.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    run.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring starts")
    run.add_argument("--think-ms", type=float, default=0.0, help="mean think time per judgment (0: flat out)")
    run.add_argument("--max-cycles", type=int, default=1_000_000, help="cap on label cycles per annotator")
    run.add_argument(
        "--no-chain", action="store_true", help="submit without ?next=1: every label does GET next + POST"
    )
    run.add_argument(
        "--threads", action="store_true", help="threads instead of processes (lighter, GIL-bound)"
    )
    run.add_argument("--tokens", default="", help="tokens file written by `seed`")
    run.add_argument("--json", default="", help="also write the figures to this JSON file")
    run.add_argument("--no-audit", action="store_true", help="skip the database audit at the end")
    run.add_argument("--seed", type=int, default=0, help="random seed of the simulated choices")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
