"""Simulated annotators judging through the REST API (in-process and over HTTP against a live
server) and through the services behind it: a noiseless one agrees with its hidden preference on
every comparison, position bias and spammers look as they should, noise flips about its share,
ranking projects get rankings, and the command and the service make token users in the
``simulated`` group. A rule over Sample rows is a preference too (ties included), each aspect can
have its own preference, a predicate flags artifacts, noise flips exactly the seeded draws whatever
the transport, and ``ServiceClient`` answers like the API."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
from django.core.management import call_command
from PIL import Image

from annotate import services
from annotate.errors import Invalid
from annotate.models import ComparisonSample, Judgment, Sample
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


# --- Rules over Sample rows, aspects, artifacts, ServiceClient -----------------------------------
def _scored_texts(make_project: Any, manager: Any, slug: str, **kwargs: Any) -> Any:
    """Four prompts with four texts each: a hidden score in the metadata (0, 1, 2, 0: one tie per
    prompt), every other text marked glitched, lengths 2..8; every pair of a prompt compared."""
    p = make_project(slug, modality="text", **kwargs)
    services.sample_create_texts(
        project=p, actor=manager,
        items=[{"prompt": f"q{i}", "text": f"{i}{k}" + "x" * ((5 * i + 3 * k) % 7), "generator": "g",
                "metadata": {"score": k % 3, "glitch": k % 2 == 1}} for i in range(4) for k in range(4)],
    )  # fmt: skip
    services.comparisons_create_random_pairs(project=p, actor=manager, pairs_per_prompt=6, seed=0)
    return p


def _higher(a: Sample, b: Sample) -> int | str:
    sa, sb = a.metadata["score"], b.metadata["score"]
    return "tie" if sa == sb else a.id if sa > sb else b.id


def _longer(a: Sample, b: Sample) -> int | str:
    return "tie" if len(a.text) == len(b.text) else a.id if len(a.text) > len(b.text) else b.id


def _outcome(j: Judgment, verdict: int | str) -> str:
    """A verdict (the winner's id or "tie") as the judgment stores it, in canonical order."""
    first = ComparisonSample.objects.get(comparison_id=j.comparison_id, position=0).sample_id
    return str(verdict) if isinstance(verdict, str) else "a" if verdict == first else "b"


def _shown(j: Judgment) -> tuple[Sample, Sample]:
    a, b = (Sample.objects.get(id=s) for s in j.displayed_order)
    return a, b


def test_a_rule_judges_ties_its_own_aspects_and_flags_artifacts(
    make_project: Any, manager: Any, annotator: Any, make_user: Any
) -> None:
    other = make_user("other")
    aspects = [{"key": k, "label": k.title()} for k in ("style", "detail", "tone")]
    p = _scored_texts(
        make_project,
        manager,
        "rules",
        annotators=(annotator, other),
        allow_tie=True,
        aspects=aspects,
        overlap=2,
    )
    profile = sim.Profile(
        sim.Rule(_higher),
        aspects={"style": sim.Rule(lambda a, b: _higher(b, a)), "detail": sim.Length()},  # tone: unanswered
        artifacts=lambda s: s.metadata["glitch"],
    )
    w = sim.SimulatedAnnotator(sim.ServiceClient(annotator), p.slug, profile)
    r = w.run(idle_polls=1, idle_wait_s=0.0)
    assert (r.labels, r.skips, r.errors, r.exhausted) == (24, 0, {}, True)
    mine = Judgment.objects.filter(project=p, annotator=annotator)
    assert [j.outcome for j in mine].count("tie") == 4  # one tie per prompt
    for j in mine:
        a, b = _shown(j)
        assert j.outcome == _outcome(j, _higher(a, b))
        assert j.aspects == {"style": _outcome(j, _higher(b, a)), "detail": _outcome(j, _longer(a, b))}
        assert j.artifacts == [
            {"sample": s.id, "tags": ["blur"], "regions": []} for s in (a, b) if s.metadata["glitch"]
        ]
        assert j.source == "simulated"
    # Without per-aspect preferences every aspect gets the overall verdict, as before.
    plain = sim.SimulatedAnnotator(sim.ServiceClient(other), p.slug, sim.Profile(sim.Rule(_higher)))
    assert plain.run(idle_polls=1, idle_wait_s=0.0).labels == 24
    for j in Judgment.objects.filter(project=p, annotator=other):
        assert j.aspects == dict.fromkeys(("style", "detail", "tone"), j.outcome) and j.artifacts == []


def test_noise_flips_exactly_the_seeded_draws_through_either_in_process_transport(
    make_project: Any, manager: Any
) -> None:
    p = _scored_texts(make_project, manager, "noisy", allow_tie=True, overlap=2)
    (u1, token), (u2, _) = simulated_annotators_ensure(project=p, actor=manager, count=2)
    profile = sim.Profile(sim.Rule(_higher), noise=0.4, seed=7)
    for client in (sim.DjangoClient(token), sim.ServiceClient(u2)):
        assert sim.SimulatedAnnotator(client, p.slug, profile).run(idle_polls=1, idle_wait_s=0.0).labels == 24
    # One draw per left/right verdict, in the order judged (comparison ids); ties draw nothing.
    draws = random.Random(7)
    expected = [draws.random() < 0.4 for _ in range(20)]
    assert sum(expected) == 11  # 55% of 20 with this seed; exact, not about 40%
    for user in (u1, u2):
        flips = []
        for j in Judgment.objects.filter(project=p, annotator=user).order_by("comparison_id"):
            truth = _higher(*_shown(j))
            if truth == "tie":
                assert j.outcome == "tie"  # never flipped
            else:
                flips.append(j.winner_id != truth)
        assert flips == expected
    assert set(Judgment.objects.filter(project=p).values_list("source", flat=True)) == {"simulated"}


def test_a_rule_ranks_and_a_bad_answer_stops_the_run(make_project: Any, manager: Any, annotator: Any) -> None:
    r = make_project("rk", modality="text", mode="ranking", k=3, annotators=(annotator,))
    made = services.sample_create_texts(
        project=r, actor=manager,
        items=[{"prompt": "q", "text": f"t{n}", "generator": "g", "metadata": {"score": n}} for n in (2, 9, 5)],
    )  # fmt: skip
    services.comparisons_create(project=r, actor=manager, specs=[{"samples": [m.sample.id for m in made]}])
    w = sim.SimulatedAnnotator(sim.ServiceClient(annotator), r.slug, sim.Profile(sim.Rule(_higher)))
    assert w.run(idle_polls=1, idle_wait_s=0.0).labels == 1
    (j,) = Judgment.objects.filter(project=r)
    assert [Sample.objects.get(id=s).metadata["score"] for s in (j.ranking or [])] == [9, 5, 2]
    p = _scored_texts(make_project, manager, "bad", annotators=(annotator,))
    w = sim.SimulatedAnnotator(sim.ServiceClient(annotator), p.slug, sim.Profile(sim.Rule(lambda a, b: 0)))
    with pytest.raises(sim.RuleError, match="the rule answered 0 for samples"):
        w.run(idle_polls=1, idle_wait_s=0.0)
    assert not Judgment.objects.filter(project=p).exists()


def test_the_service_client_answers_like_the_api(make_project: Any, manager: Any, make_user: Any) -> None:
    p = image_project(make_project, manager, prompts=1, per_prompt=3, pairs_per_prompt=3)
    ((user, token),) = simulated_annotators_ensure(project=p, actor=manager, count=1)
    svc, api = sim.ServiceClient(user), sim.DjangoClient(token)  # the same annotator
    base = f"/api/projects/{p.slug}"
    code, body = svc.request("GET", f"{base}/next/?n=1")
    (item,) = body["items"]
    assert code == 200 and (body["options"], body["aspects"], body["mode"]) == (
        {"tie": True, "both_bad": True}, [], "pairwise",
    )  # fmt: skip
    assert set(item) == {"assignment", "comparison", "expires_at", "prompt", "samples"}
    url = item["samples"][0]["url"]
    assert svc.fetch(url) == api.fetch(url) == Sample.objects.get(id=item["samples"][0]["id"]).media.read()
    assert api.request("GET", f"{base}/next/?n=1") == (200, body)  # the held lease, the same JSON
    assert svc.request("POST", f"{base}/skip/", {"assignment": item["assignment"]}) == (
        200, {"assignment": item["assignment"], "status": "skipped"},
    )  # fmt: skip
    late = {"assignment": item["assignment"], "choice": "left", "source": "simulated"}
    refused = svc.request("POST", f"{base}/judgments/", late)
    assert refused[0] == 409 and refused == api.request("POST", f"{base}/judgments/", late)
    assert svc.request("POST", f"{base}/skip/", {"assignment": item["assignment"]}) == api.request(
        "POST", f"{base}/skip/", {"assignment": item["assignment"]}
    )
    stranger = sim.ServiceClient(make_user("stranger"))
    code, body = stranger.request("GET", f"{base}/next/?n=1")
    assert code == 404 and body["error"]["code"] == "not_found"
    code, body = svc.request("GET", f"{base}/progress/")
    assert (code, body["error"]["message"]) == (404, f"GET {base}/progress/ is not a labeling operation")
    with pytest.raises(OSError, match="404"):
        svc.fetch("/media/samples/0?v=x")
    # The other two comparisons, judged by brightness from the fetched pictures.
    w = sim.SimulatedAnnotator(svc, p.slug, sim.Profile(sim.Brightness()))
    assert w.run(idle_polls=1, idle_wait_s=0.0).labels == 2
    assert _agreement(p, _luminance) == (2, 2)


def test_the_structure_preference_counts_markdown_structure_less_fillers() -> None:
    from simulate.annotators import Output, Structure, preference_from_spec
    from simulate.generators import DEMO_PROMPTS, compose_text

    pref = preference_from_spec("structure")
    assert isinstance(pref, Structure)
    # 3 structured lines (a numbered item, a dash item, a heading), 3 fillers.
    assert pref.scores([""], [Output("text", text="1. a\n- b\n### c\nBasically, anyway!!")]) == [0.0]
    assert pref.scores([""], [Output("text", text="```\nx\n```")]) == [2.0]
    # It tells the clean templated answers from the noisy ones, prompt by prompt.
    for p in DEMO_PROMPTS["text"]:
        clean = pref.scores([p] * 5, [Output("text", text=compose_text(p, seed=i)) for i in range(5)])
        noisy = pref.scores(
            [p] * 5, [Output("text", text=compose_text(p, seed=i, style="noisy")) for i in range(5)]
        )
        assert min(clean) > max(noisy)
