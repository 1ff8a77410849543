"""Simulated annotators judging through the REST API (in-process and over HTTP against a live
server): a noiseless one agrees with its hidden preference on every comparison, position bias and
spammers look as they should, noise flips about its share, ranking projects get rankings, and the
command and the service make token users in the ``simulated`` group."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command
from PIL import Image

from annotate import services
from annotate.errors import Invalid
from annotate.models import Judgment, Sample
from simulate import annotators as sim
from simulate.services import simulated_annotators_ensure, simulated_annotators_run
from tests.rewards.helpers import image_project

pytestmark = pytest.mark.django_db


def _luminance(sample: Sample) -> float:
    with Image.open(sample.media.path) as im:
        return sim._luminance(im)


def _agreement(project: Any, truth: Any) -> tuple[int, int]:
    """(judgments whose winner is the truth's pick, judgments)."""
    agree = total = 0
    for j in Judgment.objects.filter(project=project).select_related("comparison"):
        a, b = (Sample.objects.get(id=s) for s in j.displayed_order)
        total += 1
        agree += int(j.winner_id == (a.id if truth(a) > truth(b) else b.id))
    return agree, total


def _workers(project: Any, manager: Any, profiles: list[sim.Profile]) -> list[sim.SimulatedAnnotator]:
    accounts = simulated_annotators_ensure(project=project, actor=manager, count=len(profiles))
    return [
        sim.SimulatedAnnotator(sim.DjangoClient(token), project.slug, p)
        for (_, token), p in zip(accounts, profiles, strict=True)
    ]


def test_a_noiseless_annotator_follows_its_preference_everywhere(make_project: Any, manager: Any) -> None:
    p = image_project(make_project, manager, prompts=2, per_prompt=6, pairs_per_prompt=6, overlap=2)
    # One after the other in this thread: the test's rows are not committed, so other threads'
    # connections would not see them (the live-server test runs them side by side).
    results = [
        w.run() for w in _workers(p, manager, [sim.Profile(sim.Brightness(), seed=k) for k in range(2)])
    ]
    assert all(r.exhausted and not r.errors for r in results), results
    assert sum(r.labels for r in results) == Judgment.objects.filter(project=p).count() == 24  # overlap 2
    assert _agreement(p, _luminance) == (24, 24)
    assert set(Judgment.objects.filter(project=p).values_list("source", flat=True)) == {"simulated"}


def test_position_bias_spammers_and_noise(make_project: Any, manager: Any) -> None:
    p = image_project(make_project, manager, prompts=2, per_prompt=10, pairs_per_prompt=40, overlap=3)
    biased, spammer, noisy = _workers(
        p, manager,
        [sim.Profile(sim.Brightness(), position_bias=1.0), sim.Profile(sim.Brightness(), spammer=True, seed=1),
         sim.Profile(sim.Brightness(), noise=0.3, seed=2)],
    )  # fmt: skip
    for w in (biased, spammer, noisy):
        assert w.run().labels == 80
    by = {
        name: list(Judgment.objects.filter(project=p, annotator__username=f"sim-{p.slug}-{n}"))
        for n, name in ((1, "biased"), (2, "spammer"), (3, "noisy"))
    }
    assert all(j.winner_id == j.displayed_order[0] for j in by["biased"])  # always the left one
    left = sum(j.winner_id == j.displayed_order[0] for j in by["spammer"])
    assert 25 <= left <= 55  # a coin per comparison: about half of 80
    agree = 0
    for j in by["noisy"]:
        a, b = (Sample.objects.get(id=s) for s in j.displayed_order)
        agree += int(j.winner_id == (a.id if _luminance(a) > _luminance(b) else b.id))
    assert 0.55 <= agree / 80 <= 0.85  # 30% flipped


def test_texts_ties_and_rankings(make_project: Any, manager: Any) -> None:
    p = make_project("kw", modality="text", allow_tie=True)
    services.sample_create_texts(
        project=p, actor=manager,
        items=[{"prompt": "q", "text": t, "generator": "g"} for t in ("please help", "help", "please please", "no")],
    )  # fmt: skip
    services.comparisons_create_random_pairs(project=p, actor=manager, pairs_per_prompt=6, seed=0)
    (w,) = _workers(p, manager, [sim.Profile(sim.Keyword("please"))])
    assert w.run().labels == 6
    for j in Judgment.objects.filter(project=p):
        a, b = (Sample.objects.get(id=s) for s in j.displayed_order)
        ka, kb = a.text.count("please"), b.text.count("please")
        assert j.outcome == "tie" if ka == kb else j.winner_id == (a.id if ka > kb else b.id)
    r = make_project("rk", modality="text", mode="ranking", k=3)
    made = services.sample_create_texts(
        project=r,
        actor=manager,
        items=[{"prompt": "q", "text": "x" * n, "generator": "g"} for n in (2, 9, 5)],
    )
    services.comparisons_create(project=r, actor=manager, specs=[{"samples": [m.sample.id for m in made]}])
    (w,) = _workers(r, manager, [sim.Profile(sim.Length())])
    assert w.run().labels == 1
    (j,) = Judgment.objects.filter(project=r)
    assert [len(Sample.objects.get(id=s).text) for s in (j.ranking or [])] == [9, 5, 2]


@pytest.mark.django_db(transaction=True)
def test_over_http_against_a_live_server(live_server: Any, make_project: Any, manager: Any) -> None:
    p = image_project(make_project, manager, prompts=1, per_prompt=4, pairs_per_prompt=3, overlap=2)
    out = simulated_annotators_run(
        project_id=p.id, annotators=2, preference="brightness", noise=0.0, url=live_server.url
    )
    assert out == {"annotators": 2, "judgments": 6, "skips": 0, "errors": {}}
    assert _agreement(p, _luminance) == (6, 6)


@pytest.mark.django_db(transaction=True)  # the annotators run side by side, each its own connection
def test_the_command_and_refusals(make_project: Any, manager: Any) -> None:
    p = image_project(make_project, manager, prompts=1, per_prompt=4, pairs_per_prompt=4)
    out = io.StringIO()
    call_command("simulate_annotators", project=p.slug, annotators=2, labels=2, noise=0.0, stdout=out)
    assert out.getvalue().strip() == "4 judgments, 0 skips, errors none"
    users = {j.annotator.username for j in Judgment.objects.filter(project=p).select_related("annotator")}
    assert users == {f"sim-{p.slug}-1", f"sim-{p.slug}-2"}
    for j in Judgment.objects.filter(project=p).select_related("annotator"):
        assert j.annotator.groups.filter(name="simulated").exists() and not j.annotator.has_usable_password()
    with pytest.raises(Invalid, match="unknown preference"):
        simulated_annotators_run(project_id=p.id, preference="sweetness")
    with pytest.raises(Invalid, match=r"count must be 1\.\.200"):
        simulated_annotators_run(project_id=p.id, annotators=0)
    with pytest.raises(ValueError, match="noise must be in"):
        sim.Profile(sim.Brightness(), noise=1.5)
