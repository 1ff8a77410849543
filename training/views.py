"""The loop's project page: its settings, each round's timeline and the guard's plot."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from annotate import selectors
from annotate.errors import ServiceError
from annotate.models import Prompt
from annotate.views import with_csp
from rewards.models import RewardModelVersion
from rewards.plots import line_chart
from training.models import LoopConfig, LoopRound, SamplingJob
from training.plots import guard_chart


@login_required
@with_csp
def loop_page(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        project, _ = selectors.project_for_member(slug=slug, user=request.user)
    except ServiceError as exc:
        raise Http404(exc.message) from exc
    config = LoopConfig.objects.filter(project=project).first()
    rounds = list(LoopRound.objects.filter(project=project).order_by("number"))
    guard = guard_chart(
        [
            {
                "number": r.number,
                "state": r.state,
                "human_win_rate": r.human_win_rate,
                "human_ci_low": r.human_ci_low,
                "human_ci_high": r.human_ci_high,
                "predicted_win_rate": r.predicted_win_rate,
            }
            for r in rounds
        ]
    )
    kl_points = [(float(r.number), float(r.kl)) for r in rounds if r.kl is not None]
    kl = (
        line_chart({"KL": kl_points}, title="KL to the reference, per round", xlabel="round")
        if kl_points
        else ""
    )
    context = {
        "project": project, "config": config, "rounds": rounds, "guard": guard, "kl": kl,
        "gallery": _gallery(rounds), "accuracy": _accuracy(rounds),
    }  # fmt: skip
    return render(request, "training/loop.html", context)


def _gallery(rounds: list[LoopRound], *, per_prompt: int = 1) -> dict[str, Any]:
    """Before and after: for each prompt and its first seed, the base version's output and each
    round's new version's output on the same prompt and seed (rows), one column per round."""
    jobs = {
        j.id: j
        for j in SamplingJob.objects.filter(id__in=[r.sampling_job_id for r in rounds if r.sampling_job_id])
    }
    columns: list[str] = []
    cells: dict[tuple[int, int], list[int | None]] = {}
    for r in rounds:
        job = jobs.get(r.sampling_job_id or 0)
        if job is None or not job.outputs:
            continue
        if not columns:
            columns.append("base")
            for p, seed, sid in job.outputs.get("incumbent", []):
                cells.setdefault((int(p), int(seed)), []).append(int(sid))
        columns.append(f"round {r.number}")
        new = {(int(p), int(seed)): int(sid) for p, seed, sid in job.outputs.get("new", [])}
        for key, row in cells.items():
            row.append(new.get(key))
    seeds: dict[int, list[int]] = {}
    for p, seed in sorted(cells):
        seeds.setdefault(p, []).append(seed)
    texts = dict(Prompt.objects.filter(id__in=list(seeds)).values_list("id", "text"))
    rows = [
        {"prompt": texts.get(p, ""), "samples": cells[(p, seed)]}
        for p in sorted(seeds)
        for seed in seeds[p][:per_prompt]
    ]
    return {"columns": columns, "rows": rows}


def _accuracy(rounds: list[LoopRound]) -> str:
    """Each round's reward model's held-out accuracy (it rises with the labels, or it does not)."""
    ids = [r.reward_job_id for r in rounds if r.reward_job_id]
    versions = {v.job_id: v for v in RewardModelVersion.objects.filter(job_id__in=ids).order_by("id")}
    points = []
    for r in rounds:
        v = versions.get(r.reward_job_id or 0)
        acc = (v.metrics or {}).get("holdout_accuracy") if v else None
        if isinstance(acc, int | float):
            points.append((float(r.number), float(acc)))
    if not points:
        return ""
    return line_chart({"held-out accuracy": points}, title="Reward model accuracy, per round", xlabel="round")
