"""The leaderboard of generator versions from a project's judgments: a small case whose ratings
are worked out by hand (judged through the real labeling services), ties as half wins, per aspect,
k-wise rankings as their pairs; the API and the page; refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest

from annotate import selectors, services
from annotate.models import Judgment, Sample
from tests.factories import client_for
from tests.rewards.helpers import simulate

pytestmark = pytest.mark.django_db


def _project(make_project: Any, manager: Any, annotator: Any, *, slug: str = "lb", **kw: Any) -> Any:
    """Four prompts, one output each from versions v1 and v2, one comparison per prompt."""
    p = make_project(slug, modality="text", annotators=(annotator,), **kw)
    services.sample_create_texts(
        project=p, actor=manager,
        items=[{"prompt": f"q{i}", "text": f"answer {i} by {v}", "generator": "g", "generator_version": v}
               for i in range(4) for v in ("v1", "v2")],
    )  # fmt: skip
    services.comparisons_create_random_pairs(project=p, actor=manager, pairs_per_prompt=1, seed=0)
    return p


def _by(name: str) -> Any:
    return lambda a, b: (a if a.generator_version.name == name else b).id


def test_v1_winning_three_of_four_is_log3_ahead(make_project: Any, manager: Any, annotator: Any) -> None:
    p = _project(make_project, manager, annotator)

    def rule(a: Sample, b: Sample) -> int:
        winner = "v2" if a.prompt.text == "q3" else "v1"  # v1 wins three prompts, v2 one
        return int(_by(winner)(a, b))

    assert simulate(p, annotator, rule, noise=0.0) == 4
    rows = selectors.leaderboard(project=p, rounds=50)
    assert [r["name"] for r in rows] == ["v1", "v2"]
    assert [(r["games"], r["wins"], r["ties"]) for r in rows] == [(4, 3, 0), (4, 1, 0)]
    # By hand: theta1 - theta2 = ln 3, i.e. 400 * log10(3) = 190.8 Elo points, centred on 1000.
    assert rows[0]["rating"] == pytest.approx(1000 + 200 * math.log10(3), abs=0.2)
    assert rows[1]["rating"] == pytest.approx(1000 - 200 * math.log10(3), abs=0.2)
    assert all(r["ci_low"] <= r["rating"] <= r["ci_high"] for r in rows)


def test_ties_count_half_and_aspects_have_their_own_board(
    make_project: Any, manager: Any, annotator: Any
) -> None:
    p = _project(
        make_project, manager, annotator, aspects=[{"key": "style", "label": "Style"}], allow_tie=True
    )

    def rule(a: Sample, b: Sample) -> int | str:
        return "tie" if a.prompt.text in ("q0", "q1") else int(_by("v1")(a, b))

    simulate(p, annotator, rule, noise=0.0, aspects=lambda a, b: {"style": _by("v2")(a, b)})
    overall = selectors.leaderboard(project=p, rounds=20)
    assert [(r["name"], r["wins"], r["ties"]) for r in overall] == [("v1", 2, 2), ("v2", 0, 2)]
    # v1 scores 2 + 2 * 0.5 = 3 of 4, v2 1 of 4: again ln 3 apart.
    assert overall[0]["rating"] - overall[1]["rating"] == pytest.approx(400 * math.log10(3), abs=0.3)
    style = selectors.leaderboard(project=p, aspect="style", rounds=20)
    assert [r["name"] for r in style] == ["v2", "v1"] and style[0]["wins"] == 4


def test_a_ranking_counts_as_all_its_pairs(make_project: Any, manager: Any, annotator: Any) -> None:
    p = make_project("rk", modality="text", annotators=(annotator,), mode="ranking", k=3)
    made = services.sample_create_texts(
        project=p, actor=manager,
        items=[{"prompt": "q", "text": f"by {v}", "generator": "g", "generator_version": v} for v in ("a", "b", "c")],
    )  # fmt: skip
    services.comparisons_create(project=p, actor=manager, specs=[{"samples": [s.sample.id for s in made]}])
    (lease,) = services.assignment_next(project=p, annotator=annotator, n=1)
    best_first = sorted(Sample.objects.filter(project=p), key=lambda s: s.text)  # a > b > c
    services.judgment_submit(
        project=p, annotator=annotator, assignment_id=lease.id, choice="ranking",
        ranking=[s.id for s in best_first], source=Judgment.Source.SIMULATED,
    )  # fmt: skip
    rows = selectors.leaderboard(project=p, rounds=10)
    assert [(r["name"], r["games"], r["wins"]) for r in rows] == [("a", 2, 2), ("b", 2, 1), ("c", 2, 0)]


def test_api_and_page(make_project: Any, manager: Any, annotator: Any, make_user: Any) -> None:
    p = _project(make_project, manager, annotator, aspects=[{"key": "style", "label": "Style"}])
    simulate(p, annotator, _by("v2"), noise=0.0)
    api = client_for(annotator)
    body = api.get(f"/api/projects/{p.slug}/leaderboard/").json()
    assert body["aspect"] is None and [r["name"] for r in body["versions"]] == ["v2", "v1"]
    assert body["versions"][0]["games"] == 4 and body["versions"][0]["wins"] == 4
    r = api.get(f"/api/projects/{p.slug}/leaderboard/?aspect=nope")
    assert r.status_code == 400 and "unknown aspect" in r.json()["error"]["message"]
    assert client_for(make_user("stranger")).get(f"/api/projects/{p.slug}/leaderboard/").status_code == 404
    from django.test import Client

    web = Client()
    web.force_login(annotator)
    page = web.get(f"/projects/{p.slug}/leaderboard/")
    html = page.content.decode()
    assert page.status_code == 200 and "<svg" in html and "g v2" in html
    assert html.index("<td>v2</td>") < html.index("<td>v1</td>")
    assert web.get(f"/projects/{p.slug}/leaderboard/?aspect=nope").status_code == 404
    stranger = Client()
    stranger.force_login(make_user("stranger2"))
    assert stranger.get(f"/projects/{p.slug}/leaderboard/").status_code == 404
