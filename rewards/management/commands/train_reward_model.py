"""`manage.py train_reward_model --project SLUG --kind bt --encoder PATH [--holdout 0.2 ...]`.

Runs the same job the admin and the API launch, in the foreground with a progress bar per phase, and
prints the new version's metrics: held-out accuracy and ECE first, next to the baseline it must beat
(an L2 logistic regression on the frozen features, scored on the same held-out pairs)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from annotate.errors import ServiceError
from annotate.management.acting import acting_user
from annotate.models import DatasetSnapshot
from annotate.selectors import project_get
from rewards import services
from rewards.ml.names import KINDS
from rewards.models import RewardModelVersion, RewardTrainingJob


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


class Command(BaseCommand):
    help = "Train a reward model in the foreground and print its metrics."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True)
        parser.add_argument("--kind", choices=list(KINDS))
        parser.add_argument(
            "--encoder", help="local encoder directory (default: the project's reward config)"
        )
        parser.add_argument("--holdout", type=float, help="share of comparisons held out (default 0.2)")
        parser.add_argument("--snapshot", type=int, help="train on this raw snapshot (default: a new one)")
        parser.add_argument("--device", default="cpu")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a hyperparameter, e.g. --set epochs=20",
        )
        parser.add_argument(
            "--no-promote", dest="promote", action="store_false", help="skip champion/challenger"
        )
        parser.add_argument(
            "--as-user", dest="as_user", help="user recorded on the job (default: first superuser)"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        hyper: dict[str, Any] = {}
        for item in opts["set"]:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--set takes KEY=VALUE, got {item!r}")
            hyper[key.strip()] = _value(raw.strip())
        try:
            project = project_get(slug=opts["project"])
            snapshot = None
            if opts["snapshot"] is not None:
                snapshot = DatasetSnapshot.objects.filter(project=project, id=opts["snapshot"]).first()
                if snapshot is None:
                    raise CommandError(f"no snapshot {opts['snapshot']} in {project.slug}")
            job = services.reward_job_create(
                project=project,
                actor=acting_user(opts["as_user"]),
                kind=opts["kind"],
                encoder_path=opts["encoder"],
                snapshot=snapshot,
                hyperparameters=hyper,
                holdout=opts["holdout"],
                device=opts["device"],
                promote=opts["promote"],
                dispatch=False,
            )
        except ServiceError as exc:
            raise CommandError(exc.message) from exc
        self.stderr.write(f"job {job.id}: {job.kind} on {job.encoder.name}, snapshot {job.snapshot_id}")
        bar = tqdm(total=0, unit="step", dynamic_ncols=True)
        phase = {"name": ""}

        def echo(state: dict[str, Any]) -> None:
            # Each phase has its own counter: training counts steps, the others their own units.
            training = state.get("phase") == "training"
            done = state.get("step") if training else state.get("done", state.get("rows"))
            total = state.get("total_steps") if training else state.get("total")
            if state.get("phase") != phase["name"]:
                phase["name"] = state.get("phase", "")
                bar.reset(total=total or None)
                bar.unit = "step" if training else "item"
                bar.set_description(phase["name"])
            elif total and bar.total != total:
                bar.reset(total=total)
            if done is not None:
                bar.n = int(done)
            if training and "loss" in state:
                bar.set_postfix(loss=state["loss"])
            bar.refresh()

        job = services.reward_job_run(job_id=job.id, progress=echo)
        bar.close()
        if job.status != RewardTrainingJob.Status.SUCCEEDED:
            raise CommandError(f"job {job.id} {job.status}: {job.error}")
        version = RewardModelVersion.objects.get(job=job)
        m = version.metrics

        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

        baseline = m.get("baseline") or {}
        acc, base_acc = m.get("holdout_accuracy"), baseline.get("accuracy")
        verdict = ""
        if acc is not None and base_acc is not None:
            verdict = "  beats the baseline" if acc > base_acc else "  does NOT beat the baseline"
        lines = [
            f"held-out accuracy   {fmt(acc)}  ({m.get('holdout_pairs')} pairs){verdict}",
            f"calibration (ECE)   {fmt(m.get('ece'))}",
            f"baseline accuracy   {fmt(base_acc)}  (L2 logistic regression on the frozen features, "
            f"ECE {fmt(baseline.get('ece'))})",
            f"gold accuracy       {fmt(m.get('gold_accuracy'))}",
            f"majority agreement  {fmt(m.get('majority_agreement'))}",
        ]
        for aspect, acc in sorted((m.get("aspect_accuracy") or {}).items()):
            lines.append(f"aspect {aspect:<12} {fmt(acc)}")
        decision = version.decision or {}
        lines += [
            f"train pairs         {m.get('train_pairs')}",
            f"version             v{version.number} ({version.kind}) at {version.path}",
            f"active              {'yes' if version.is_active else 'no'}: {decision.get('reason', 'not decided')}",
        ]
        self.stdout.write("\n".join(lines))
