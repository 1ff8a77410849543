"""The loop's project page: its settings, each round's timeline and the guard's plot."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from annotate import selectors
from annotate.errors import ServiceError
from annotate.views import with_csp
from rewards.plots import line_chart
from training.models import LoopConfig, LoopRound
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
    context = {"project": project, "config": config, "rounds": rounds, "guard": guard, "kl": kl}
    return render(request, "training/loop.html", context)
