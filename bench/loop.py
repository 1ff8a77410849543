"""The closed loop on CPU (not a test): wall time and labels per round, and the true score per round.

A fresh copy of the loop demo that `make demo` seeds (``--generator demo``: the demo's trained
text-to-image model, its first outputs, its loop settings), or a project of random-pattern images
with a tiny random SD-like pipeline (``--generator tiny``), is judged by a simulated annotator
whose hidden truth is brightness (with ``--generator text``: the demo language model judged by
tidiness, the ``structure`` preference) through the REST API, in-process; the loop controller
(``training.services.loop``) is ticked until ``--rounds`` rounds are evaluated or flagged. The
jobs each tick launches run here, one after the other (as a worker would run them), so every phase
is timed.

    .venv/bin/python bench/loop.py                       # 3 rounds of the demo
    .venv/bin/python bench/loop.py --generator text              # the text loop demo (GRPO, TRL)
    .venv/bin/python bench/loop.py --generator video             # the video loop demo (Flow-GRPO)
    .venv/bin/python bench/loop.py --generator tiny --rounds 2

Reports per round: seconds per phase (labels, reward training, RL, sampling, verdicts), labels
used, the reward model's held-out accuracy, the predicted and the human win rate of the new
version against the incumbent, and the true score of the new, the incumbent and the base
outputs on the same prompts and seeds. Each round continues the last evaluated round's adapter,
so the true score should climb round after round.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--labels", type=int, default=40, help="new judgments before each round trains")
    parser.add_argument("--verdicts", type=int, default=8, help="verdicts on the new version per round")
    parser.add_argument(
        "--iterations", type=int, default=0, help="DDPO iterations per round (default: the demo's 8, tiny 12)"
    )
    parser.add_argument("--noise", type=float, default=0.1, help="share of the annotators' verdicts flipped")
    parser.add_argument(
        "--slug", default="", help="the project's slug (default: bench-loop-<time>, a new one)"
    )
    parser.add_argument(
        "--generator",
        choices=["demo", "text", "video", "tiny"],
        default="demo",
        help="demo: the demo's trained text-to-image model and its loop settings (as make demo); "
        "text: the demo's trained language model and the text loop's settings (GRPO through TRL), "
        "judged by tidiness (the structure preference); video: the demo's trained text-to-video "
        "model and the video loop's settings (Flow-GRPO), judged by brightness; tiny: a tiny random "
        "SD-like pipeline on "
        "random-pattern images",
    )
    args = parser.parse_args(argv)

    import annotation_load

    annotation_load.setup_django()
    import numpy as np
    from django.contrib.auth import get_user_model
    from PIL import Image

    from annotate.models import Project, Sample
    from rewards import services as reward_services
    from rewards.models import RewardModelVersion
    from simulate import annotators as sim
    from simulate.demo import loop_demo_seed
    from simulate.services import simulated_annotators_ensure
    from training import services
    from training.models import LoopConfig, LoopRound, SamplingJob

    print(f"machine: {annotation_load.machine_info()}")
    owner, _ = get_user_model().objects.update_or_create(
        username="bench-loop-manager", defaults={"is_staff": True}
    )
    slug = args.slug or f"bench-loop-{int(time.time())}"
    if Project.objects.filter(slug=slug).exists():
        raise SystemExit(f"project {slug} exists: pick another --slug")
    t = time.perf_counter()
    modality = {"demo": "image", "text": "text", "video": "video"}.get(args.generator)
    if modality is not None:
        project = loop_demo_seed(
            modality, owner=owner, slug=slug, retrain_after=args.labels, verdicts_needed=args.verdicts,
            max_rounds=args.rounds,
        )  # fmt: skip
        if args.iterations:  # text GRPO counts steps, the diffusion trainers iterations
            key = "steps" if modality == "text" else "iterations"
            LoopConfig.objects.filter(project=project).update(
                rl_config={**project.loop.rl_config, key: args.iterations}
            )
    else:
        project = _tiny_project(owner, slug, args)
    print(f"seeded in {time.perf_counter() - t:.1f} s (the demo generator is trained once, under var/)")
    ((_, token),) = simulated_annotators_ensure(project=project, actor=owner, count=1)
    truth: Any = sim.Structure() if args.generator == "text" else sim.Brightness()
    judge = sim.SimulatedAnnotator(
        sim.DjangoClient(token), project.slug, sim.Profile(truth, noise=args.noise)
    )

    def true_score(ids: set[int]) -> float:
        """The annotators' hidden truth, averaged over the samples: brightness, or structure."""
        values = []
        for s in Sample.objects.filter(id__in=ids):
            if s.modality == "text":
                values += truth.scores([""], [sim.Output("text", text=s.text)])
                continue
            if s.modality == "video":
                with open(s.media.path, "rb") as f:
                    values += truth.scores([""], [sim.decode("video", f.read())])
                continue
            with Image.open(s.media.path) as im:
                values.append(float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0))
        return float(np.mean(values))

    rows: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        times: dict[str, float] = {}
        t = time.perf_counter()
        r = services.loop_tick(project_id=project.id, dispatch=False)
        labels = judge.run(max_labels=args.labels).labels
        r = services.loop_tick(project_id=project.id, dispatch=False)
        times["labels"] = time.perf_counter() - t
        if r is None or r.state != "reward_training" or r.reward_job_id is None:
            print(f"round {number}: stuck before reward training: {r and r.reason}")
            break
        t = time.perf_counter()
        reward_services.reward_job_run(job_id=r.reward_job_id)
        r = services.loop_tick(project_id=project.id, dispatch=False)
        times["reward"] = time.perf_counter() - t
        assert r is not None and r.rl_job_id is not None, r and r.reason
        t = time.perf_counter()
        services.rl_job_run(job_id=r.rl_job_id)
        r = services.loop_tick(project_id=project.id, dispatch=False)
        times["rl"] = time.perf_counter() - t
        assert r is not None and r.sampling_job_id is not None, r and r.reason
        t = time.perf_counter()
        sampling_id = r.sampling_job_id
        services.sampling_job_render(job_id=sampling_id)
        services.sampling_job_queue(job_id=sampling_id)
        r = services.loop_tick(project_id=project.id, dispatch=False)
        times["sampling"] = time.perf_counter() - t
        t = time.perf_counter()
        # People judge what the queue gives them (the round's comparisons among the pool's, by
        # priority) until the round has its verdicts.
        verdicts = 0
        for _ in range(200):
            verdicts += judge.run(max_labels=5).labels
            r = services.loop_tick(project_id=project.id, dispatch=False)
            if r is None or r.state != LoopRound.State.AWAITING_VERDICTS:
                break
        times["verdicts"] = time.perf_counter() - t
        assert r is not None
        job = SamplingJob.objects.get(id=sampling_id)
        rl = job.rl_job
        version = (
            RewardModelVersion.objects.get(id=rl.reward_version_id) if rl and rl.reward_version_id else None
        )
        rows.append(
            {
                "round": number, "state": r.state, "labels": labels, "verdict_judgments": verdicts,
                "holdout_accuracy": (version.metrics or {}).get("holdout_accuracy") if version else None,
                "predicted": r.predicted_win_rate, "human": r.human_win_rate,
                "new": true_score({int(s) for _, _, s in job.outputs["new"]}),
                "incumbent": true_score({int(s) for _, _, s in job.outputs["incumbent"]}),
                **{f"{k}_s": v for k, v in times.items()},
            }
        )  # fmt: skip
        row = rows[-1]
        print(
            f"round {number} {row['state']}: {sum(times.values()):.1f} s "
            + " ".join(f"{k} {v:.1f}" for k, v in times.items())
            + f"; labels {labels}; held-out accuracy {row['holdout_accuracy']}; predicted {row['predicted']}; "
            f"human {row['human']}; true {truth.name} new {row['new']:.4f} vs incumbent {row['incumbent']:.4f}"
        )
        if r.state != LoopRound.State.EVALUATED:
            print(f"round {number} stopped the loop: {r.reason}")
            break


def _tiny_project(owner: Any, slug: str, args: argparse.Namespace) -> Any:
    """Random-pattern images and a tiny random SD-like pipeline: the loop's mechanics, fast."""
    import numpy as np
    from PIL import Image

    from annotate import services as annotate_services
    from simulate.tiny_models import tiny_sd_pipeline
    from training import services

    pipe = tiny_sd_pipeline(Path(tempfile.mkdtemp(prefix="loop-bench-")) / "sd")
    project = annotate_services.project_create(creator=owner, slug=slug, name="Loop bench", modality="image")
    rng = np.random.default_rng(0)
    for p in range(4):
        for i in range(10):
            level = int(rng.integers(20, 256))
            arr = (rng.random((32, 32, 3)) * level).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            buf.seek(0)
            annotate_services.sample_create_media(
                project=project,
                actor=owner,
                file=buf,
                filename=f"{p}-{i}.png",
                prompt=f"a picture number {p}",
            )
    annotate_services.comparisons_create_random_pairs(
        project=project, actor=owner, pairs_per_prompt=40, seed=0
    )
    ddpo = {
        "pipeline": str(pipe), "iterations": args.iterations or 12, "prompts_per_iteration": 4,
        "images_per_prompt": 16, "train_batch_size": 32, "sample_steps": 4, "resolution": 8, "inner_epochs": 2,
        "learning_rate": 1e-2, "guidance_scale": 1.0, "lora_rank": 8, "lora_alpha": 16,
        "lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv_out"],
    }  # fmt: skip
    services.loop_config_set(
        project=project, actor=owner, algorithm="ddpo", rl_config=ddpo,
        feedback={"prompts": 4, "within_pairs": 0, "render": {"per_prompt": 2, "steps": 4, "guidance_scale": 1.0,
                                                               "resolution": 16}},
        reward_hyperparameters={"epochs": 5}, retrain_after=args.labels,
        verdicts_needed=args.verdicts, max_rounds=args.rounds,
    )  # fmt: skip
    return project


if __name__ == "__main__":
    main()
