"""The loop controller, tick by tick, on an image project judged "brighter wins" and a tiny SD-like
pipeline: a round waits for new judgments, trains a reward model, runs a DDPO round, renders and
queues the new version against the base, waits for verdicts and is evaluated; judges who prefer
the incumbent make the guard flag reward hacking and stop the loop; a stale tick advances nothing;
pause keeps everything where it is; refusals store nothing. The jobs the ticks launch are run here
in the test's process (the Celery path of each job is tested with its service)."""

from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

from typing import Any

import pytest

from annotate import services as annotate_services
from annotate.errors import Invalid
from annotate.models import Comparison, Judgment, ProjectMember, Sample
from rewards import services as reward_services
from rewards.models import RewardTrainingJob
from simulate.tiny_models import tiny_sd_pipeline
from tests.rewards.helpers import brighter, simulate
from tests.training.test_jobs import _config
from training import services
from training.models import LoopConfig, LoopRound, RLJob
from training.services import loop as loop_services

pytestmark = pytest.mark.django_db

RENDER = {"per_prompt": 2, "steps": 2, "guidance_scale": 1.0}


def _loop(project: Any, manager: Any, **kw: Any) -> LoopConfig:
    return services.loop_config_set(
        project=project, actor=manager, algorithm="ddpo", rl_config=_config(iterations=1),
        feedback={"prompts": 2, "within_pairs": 1, "render": RENDER}, reward_hyperparameters={"epochs": 3},
        retrain_after=6, verdicts_needed=4, max_rounds=2, **kw,
    )  # fmt: skip


def _more_judgments(
    project: Any, manager: Any, make_user: Any, name: str, n: int, rule: Any = brighter
) -> None:
    judge = make_user(name)
    annotate_services.project_member_set(
        project=project, actor=manager, user=judge, role=ProjectMember.Role.ANNOTATOR
    )
    annotate_services.comparisons_create_random_pairs(
        project=project, actor=manager, pairs_per_prompt=8, seed=7
    )
    assert simulate(project, judge, rule, limit=n) == n


def _tick(project: Any) -> LoopRound:
    r = services.loop_tick(project_id=project.id, dispatch=False)
    assert r is not None
    return r


def _to_awaiting_verdicts(project: Any, manager: Any, make_user: Any) -> LoopRound:
    r = _tick(project)
    assert (r.number, r.state) == (1, "waiting_for_labels")
    assert _tick(project).reason == "0 of 6 new judgments"
    _more_judgments(project, manager, make_user, "judge2", 6)
    r = _tick(project)
    assert r.state == "reward_training" and r.reward_job is not None
    assert r.reward_job.trigger == RewardTrainingJob.Trigger.AUTO
    assert _tick(project).state == "reward_training"  # the job has not run yet
    assert reward_services.reward_job_run(job_id=r.reward_job.id).status == "succeeded"
    r = _tick(project)
    assert r.state == "rl" and r.rl_job is not None and r.incumbent == r.rl_job.base_version
    assert r.rl_job.reward_version is not None and r.rl_job.reward_version.is_active
    assert services.rl_job_run(job_id=r.rl_job.id).status == "succeeded"
    r = _tick(project)
    assert r.state == "sampling" and r.sampling_job is not None and r.new_version == r.sampling_job.version
    assert r.kl is None  # DDPO logs no KL to a reference (GRPO does)
    assert services.sampling_job_render(job_id=r.sampling_job.id).status == "rendered"
    assert services.sampling_job_queue(job_id=r.sampling_job.id).status == "succeeded"
    r = _tick(project)
    assert r.state == "awaiting_verdicts"
    return r


def _prefer(new: bool) -> Any:
    """A judge who prefers the RL round's outputs (``<project>-rl``), or the base model's."""

    def rule(a: Sample, b: Sample) -> int:
        a_new = bool(a.generator_version and a.generator_version.generator.name.endswith("-rl"))
        return a.id if a_new == new else b.id

    return rule


def test_a_round_from_labels_to_evaluation(project: Any, manager: Any, make_user: Any, tmp_path: Any) -> None:
    _loop(project, manager)
    r = _to_awaiting_verdicts(project, manager, make_user)
    assert _tick(project).verdicts == 0  # nobody judged the round yet
    # Its versus comparisons are served first, in their fixed order, until the verdicts are in.
    fixed = Comparison.objects.filter(project=project, origin="loop", priority_fixed=True)
    assert fixed.count() == 4 and all(c.priority > 10 for c in fixed)
    judge = make_user("judge3")
    annotate_services.project_member_set(
        project=project, actor=manager, user=judge, role=ProjectMember.Role.ANNOTATOR
    )
    simulate(project, judge, _prefer(new=True), noise=0.0)  # the new version wins every time
    r = _tick(project)
    assert r.state == "evaluated" and r.verdicts == 4 and r.human_win_rate == 1.0
    assert not fixed.all().exists()  # handed back to active learning (a fresh query)
    assert r.predicted_win_rate is not None and 0.0 < r.predicted_win_rate < 1.0
    assert r.human_ci_low is not None and 0.5 < r.human_ci_low < 1.0 and r.human_ci_high == 1.0
    assert [h["state"] for h in r.history] == [
        "waiting_for_labels", "reward_training", "rl", "sampling", "awaiting_verdicts", "evaluated",
    ]  # fmt: skip
    # The page: the reward model's accuracy per round, and before/after on the same prompts and seeds.
    from django.test import Client

    web = Client()
    web.force_login(manager)
    page = web.get(f"/projects/{project.slug}/loop/").content.decode()
    assert "Reward model accuracy, per round" in page and "Before and after" in page
    job = r.sampling_job
    assert job is not None
    shown = {int(s) for s in re.findall(r'src="/media/samples/(\d+)"', page)}
    first_seed = {(p, s, i) for p, s, i in job.outputs["new"] + job.outputs["incumbent"] if s == 0}
    assert shown == {i for _, _, i in first_seed} and len(shown) == 2 * 2  # 2 prompts x (base, round 1)
    r2 = _tick(project)  # the next round begins
    assert (r2.number, r2.state) == (2, "waiting_for_labels")
    # Its new labels: everything after round 1's reward job, round 1's verdicts included.
    assert r.reward_job is not None
    seen = Judgment.objects.filter(project=project, created_at__lt=r.reward_job.created_at).count()
    assert r2.judgments_at_start == seen == r.judgments_at_start + 6
    new = Judgment.objects.filter(project=project).count() - seen
    assert new == Judgment.objects.filter(annotator=judge).count() > r.verdicts  # all of judge3's
    # It builds on round 1: its RL job continues round 1's adapter, which is its incumbent.
    _more_judgments(project, manager, make_user, "judge4", 6, rule=_prefer(new=True))
    r2 = _tick(project)
    assert r2.state == "reward_training" and r2.reward_job is not None
    assert reward_services.reward_job_run(job_id=r2.reward_job.id).status == "succeeded"
    r2 = _tick(project)
    assert r2.state == "rl" and r2.rl_job is not None and r.new_version is not None
    assert r2.rl_job.start_version == r.new_version and r2.incumbent == r.new_version
    assert r2.rl_job.config["init_lora"] == r.new_version.checkpoint
    # Each round samples afresh: its seed moves on (a round never replays an earlier one).
    assert r.rl_job is not None and (r.rl_job.config["seed"], r2.rl_job.config["seed"]) == (0, 1)
    assert r.rl_job is not None and r2.rl_job.base_version == r.rl_job.base_version  # the same base
    # Only an adapter of this project on the same base can be continued; nothing is stored otherwise.
    jobs = RLJob.objects.count()
    with pytest.raises(Invalid, match="not a LoRA version of this project"):
        services.rl_job_create(
            project=project, actor=manager, algorithm="ddpo", config=_config(iterations=1),
            start_version=r.incumbent, dispatch=False,
        )  # fmt: skip
    with pytest.raises(Invalid, match="an adapter of another base model"):
        services.rl_job_create(
            project=project, actor=manager, algorithm="ddpo",
            config=_config(iterations=1, pipeline=str(tiny_sd_pipeline(tmp_path / "other"))),
            start_version=r.new_version,
            dispatch=False,
        )  # fmt: skip
    assert RLJob.objects.count() == jobs
    # A round people did not prefer (the guard let it pass: its interval reached 1/2) is not built on.
    assert loop_services.last_good_round(project) == r
    LoopRound.objects.filter(id=r.id).update(human_win_rate=0.45)
    assert loop_services.last_good_round(project) is None


def test_the_guard_flags_a_round_people_do_not_prefer_and_stops_the_loop(
    project: Any, manager: Any, make_user: Any
) -> None:
    _loop(project, manager, guard_margin=0.1)
    _to_awaiting_verdicts(project, manager, make_user)
    judge = make_user("judge3")
    annotate_services.project_member_set(
        project=project, actor=manager, user=judge, role=ProjectMember.Role.ANNOTATOR
    )
    simulate(project, judge, _prefer(new=False), noise=0.0)  # the base wins every time
    r = _tick(project)
    assert r.state == "flagged" and r.human_win_rate == 0.0
    assert r.reason.startswith("reward hacking suspected: people preferred the new version 0% of the time")
    assert "lies below 50%" in r.reason and r.reason.endswith("The incumbent stays; the loop stopped.")
    config = LoopConfig.objects.get(project=project)
    assert not config.enabled and config.stopped_reason.startswith(
        "round 1 flagged: reward hacking suspected"
    )
    assert services.loop_tick(project_id=project.id, dispatch=False) is None  # stopped: nothing moves
    assert LoopRound.objects.filter(project=project).count() == 1


def test_a_stale_tick_advances_nothing_and_pause_keeps_the_round(
    project: Any, manager: Any, make_user: Any
) -> None:
    config = _loop(project, manager)
    stale = _tick(project)
    _more_judgments(project, manager, make_user, "judge2", 6)
    moved = _tick(project)
    assert moved.state == "reward_training", moved.reason
    # A second tick that read the round before the first one moved it: its claim fails.
    again = loop_services._waiting_for_labels(config, stale, False)
    assert again.state == "reward_training" and RewardTrainingJob.objects.filter(trigger="auto").count() == 1
    services.loop_pause(project=project, actor=manager)
    assert services.loop_tick(project_id=project.id, dispatch=False) is None
    services.loop_pause(project=project, actor=manager, paused=False)
    assert _tick(project).state == "reward_training"  # resumed where it was


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"algorithm": "text_dpo"}, "the loop runs an online algorithm"),
        ({"algorithm": "text_grpo"}, "text_grpo trains text generators"),
        ({"rl_config": {"pipeline": "/nonexistent"}}, "rl_config.pipeline"),
        ({"rl_config": {"eta": 0.0}}, "rl_config: eta must be in"),
        ({"retrain_after": 0}, "retrain_after must be an integer 1..1000000"),
        ({"guard_margin": 2}, "guard_margin must be a number in [0, 1]"),
        ({"reward_kind": "artifact"}, "reward_kind: a reward model kind"),
        ({"feedback": {"prompts": "all"}}, "feedback: prompts and within_pairs must be integers"),
    ],
)
def test_refusals_store_nothing(project: Any, manager: Any, kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"algorithm": "ddpo", "rl_config": _config(), "feedback": {"prompts": 2}}
    if "rl_config" in kw and "pipeline" not in kw["rl_config"]:
        kw = {"rl_config": _config(**kw["rl_config"])}
    with pytest.raises(Invalid) as exc:
        services.loop_config_set(project=project, actor=manager, **(args | kw))
    assert message in exc.value.message
    assert LoopConfig.objects.count() == 0


def test_an_annotator_cannot_set_the_loop(project: Any, annotator: Any) -> None:
    from annotate.errors import Forbidden, NotFound

    with pytest.raises((Forbidden, NotFound)):
        services.loop_config_set(project=project, actor=annotator, algorithm="ddpo", rl_config=_config())
    assert LoopConfig.objects.count() == 0


def test_the_loop_over_rest(project: Any, manager: Any, annotator: Any, make_user: Any) -> None:
    from tests.factories import client_for

    api, member = client_for(manager), client_for(annotator)
    url = f"/api/projects/{project.slug}/loop/"
    assert api.get(url).status_code == 404  # no loop yet
    body = {"algorithm": "ddpo", "rl_config": _config(), "feedback": {"prompts": 2}, "retrain_after": 6}
    r = member.post(url, body, format="json")
    assert r.status_code == 403 and LoopConfig.objects.count() == 0
    r = api.post(url, {**body, "rl_config": _config(eta=0.0)}, format="json")
    assert r.status_code == 400 and "rl_config: eta must be in" in r.json()["error"]["message"]
    assert LoopConfig.objects.count() == 0
    r = api.post(url, body, format="json")
    assert r.status_code == 200, r.content
    loop = r.json()
    assert loop["enabled"] and not loop["paused"] and loop["rounds"] == [] and loop["rl_config"]["pipeline"]
    services.loop_tick(project_id=project.id, dispatch=False)
    seen = member.get(url).json()
    assert "pipeline" not in seen["rl_config"]  # the server path: staff only
    assert [(x["number"], x["state"], x["reason"]) for x in seen["rounds"]] == [(1, "waiting_for_labels", "")]
    assert api.post(f"{url}pause/").json()["paused"] is True
    assert member.post(f"{url}resume/").status_code == 403
    assert api.post(f"{url}resume/").json()["paused"] is False
    assert client_for(make_user("stranger")).get(url).status_code == 404


def test_the_loop_page_and_the_admin_form(project: Any, manager: Any, annotator: Any) -> None:
    from django.test import Client

    web = Client()
    web.force_login(annotator)
    page = web.get(f"/projects/{project.slug}/loop/").content.decode()
    assert "The loop is not set for this project" in page
    _loop(project, manager)
    services.loop_tick(project_id=project.id, dispatch=False)
    page = web.get(f"/projects/{project.slug}/loop/").content.decode()
    assert "Waiting for labels" in page and "no round evaluated yet" in page
    assert "KL to the reference" not in page  # no round has logged a KL yet
    LoopRound.objects.filter(project=project).update(kl=0.0123)  # as a GRPO round logs it
    page = web.get(f"/projects/{project.slug}/loop/").content.decode()
    assert "KL to the reference, per round" in page and "0.0123" in page
    manager.is_staff = manager.is_superuser = True
    manager.save()
    admin = Client()
    admin.force_login(manager)
    url = f"/admin/training/loopconfig/{LoopConfig.objects.get().id}/change/"
    form = {
        "project": project.id, "enabled": "on", "algorithm": "ddpo", "rl_config": '{"pipeline": "/nonexistent"}',
        "feedback": '{"prompts": 2}', "reward_kind": "bt", "reward_hyperparameters": "{}", "encoder_path": "",
        "retrain_after": 9, "verdicts_needed": 4, "guard_margin": 0.2, "max_rounds": 3,
    }  # fmt: skip
    r = admin.post(url, form)
    assert r.status_code == 200 and "rl_config.pipeline" in r.content.decode()  # shown on the form
    assert LoopConfig.objects.get().retrain_after == 6  # nothing changed
    r = admin.post(url, {**form, "rl_config": json.dumps(_config())})
    assert r.status_code == 302, r.content.decode()[:2000]
    assert LoopConfig.objects.get().retrain_after == 9
