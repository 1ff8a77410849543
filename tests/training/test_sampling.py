"""Generator versions that are model directories, and sampling jobs: outputs rendered into samples
with their seed and settings, scored, and queued as comparisons (new vs incumbent on the same
prompt and seed, pairs within the new group) tagged with the round, with active-learning
priorities; reuse on a second round; every refusal with nothing stored; an RL job's feedback."""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import pytest

from annotate.errors import Forbidden, Invalid, NotFound
from annotate.models import Comparison, GeneratorVersion, Sample
from rewards.models import RewardModelVersion, SampleScore
from rewards.services import comparison_priorities_update
from simulate.tiny_models import tiny_causal_lm, tiny_sd_pipeline
from training import services
from training.models import RLJob, SamplingJob
from training.services.sampling import VERSUS_PRIORITY

pytestmark = pytest.mark.django_db

RENDER: dict[str, Any] = {"per_prompt": 2, "steps": 2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: Any) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return tiny_sd_pipeline(root / "base", seed=0), tiny_sd_pipeline(root / "tuned", seed=1)


def _register(project: Any, manager: Any, path: Path, version: str) -> GeneratorVersion:
    return services.generator_model_register(
        project=project, actor=manager, generator="tiny-sd", version=version, path=str(path)
    )


def _run(job: SamplingJob) -> SamplingJob:
    job = services.sampling_job_render(job_id=job.id)
    assert job.status == "rendered", job.error
    return services.sampling_job_queue(job_id=job.id)


def test_a_round_renders_scores_and_queues_comparisons(
    project: Any, manager: Any, pipes: tuple[Path, Path]
) -> None:
    base = _register(project, manager, pipes[0], "base")
    tuned = _register(project, manager, pipes[1], "tuned")
    assert base.metadata["kind"] == "unet" and not base.is_external and base.checkpoint == str(pipes[0])
    before = set(Sample.objects.filter(project=project).values_list("id", flat=True))
    job = services.sampling_job_create(
        project=project,
        actor=manager,
        version_id=tuned.id,
        incumbent_id=base.id,
        prompts=2,
        within_pairs=1,
        render=RENDER,
        dispatch=False,
    )
    assert (job.round, job.total, job.status) == (1, 8, "queued")
    job = _run(job)
    assert (job.status, job.done, job.samples_created, job.samples_reused) == ("succeeded", 8, 8, 0)
    new = Sample.objects.filter(project=project).exclude(id__in=before)
    assert new.count() == 8
    assert {(s.generator_version_id, s.mime_type) for s in new} == {
        (base.id, "image/png"),
        (tuned.id, "image/png"),
    }
    assert {s.metadata["seed"] for s in new} == {0, 1}
    assert all(s.metadata["steps"] == 2 and s.metadata["guidance_scale"] == 1.0 for s in new)
    assert all(s.metadata["round"] == 1 and s.metadata["sampling_job"] == job.id for s in new)
    # Scored under the active reward model (what the guard's predicted win rate reads).
    active = RewardModelVersion.objects.get(project=project, is_active=True)
    assert SampleScore.objects.filter(version=active, sample__in=new).count() == 8
    comps = list(Comparison.objects.filter(project=project, origin="loop").prefetch_related("samples"))
    assert len(comps) == job.comparisons_created == 2 * 2 + 2  # 4 new-vs-incumbent + 1 within per prompt
    assert {c.origin_round for c in comps} == {1}
    vs: list[tuple[Sample, Sample]] = []
    within: list[tuple[Sample, Sample]] = []
    for c in comps:
        a, b = list(c.samples.all())
        assert a.prompt_id == b.prompt_id == c.prompt_id
        (vs if a.generator_version_id != b.generator_version_id else within).append((a, b))
    assert len(vs) == 4 and len(within) == 2
    assert all(a.metadata["seed"] == b.metadata["seed"] for a, b in vs)  # the same starting noise
    assert all(a.generator_version_id == tuned.id for a, b in within)
    # The versus comparisons come first, in a fixed order that covers every prompt before any
    # prompt's second seed (the guard's first verdicts are a fair sample); the within-group pairs
    # get the reward model's uncertainty (not the default 0), below them.
    versus = sorted(
        (c for c in comps if len({s.generator_version_id for s in c.samples.all()}) == 2),
        key=lambda c: -c.priority,
    )
    assert all(c.priority_fixed and c.priority > VERSUS_PRIORITY for c in versus)
    assert len({c.priority for c in versus}) == 4
    assert {c.prompt_id for c in versus[:2]} == {c.prompt_id for c in versus[2:]} and len(
        {c.prompt_id for c in versus[:2]}
    ) == 2
    others = [c for c in comps if c not in versus]
    assert all(not c.priority_fixed and 0 < c.priority <= 2 for c in others)
    # Active learning reorders the within-group pairs only.
    set_before = {c.id: c.priority for c in comps}
    assert comparison_priorities_update(version=active) == 2
    for c in comps:
        c.refresh_from_db()
    assert {c.id: c.priority for c in versus} == {c.id: set_before[c.id] for c in versus}
    # The queue step is claimed: running it again queues nothing twice.
    assert services.sampling_job_queue(job_id=job.id).comparisons_created == 6
    assert Comparison.objects.filter(project=project, origin="loop").count() == 6

    # Round 2: a third version against the same incumbent; the incumbent's outputs are reused.
    third = _register(project, manager, tiny_sd_pipeline(pipes[0].parent / "third", seed=2), "third")
    job2 = _run(
        services.sampling_job_create(
            project=project,
            actor=None,
            version_id=third.id,
            incumbent_id=base.id,
            prompts=2,
            within_pairs=0,
            render=RENDER,
            dispatch=False,
        )
    )
    assert (job2.round, job2.samples_created, job2.samples_reused, job2.comparisons_created) == (2, 4, 4, 4)
    assert Comparison.objects.filter(project=project, origin="loop", origin_round=2).count() == 4


def test_a_text_round(text_project: Any, manager: Any, tmp_path: Path) -> None:
    a = services.generator_model_register(
        project=text_project,
        actor=manager,
        generator="lm",
        version="a",
        path=str(tiny_causal_lm(tmp_path / "a")),
    )
    b = services.generator_model_register(
        project=text_project,
        actor=manager,
        generator="lm",
        version="b",
        path=str(tiny_causal_lm(tmp_path / "b", seed=1)),
    )
    job = _run(
        services.sampling_job_create(
            project=text_project,
            actor=manager,
            version_id=b.id,
            incumbent_id=a.id,
            prompts=2,
            within_pairs=1,
            render={"per_prompt": 2, "max_new_tokens": 6},
            dispatch=False,
        )
    )
    texts = Sample.objects.filter(project=text_project, generator_version__in=[a, b])
    assert texts.count() == job.samples_created == 8
    assert all(s.modality == "text" and s.metadata["render"]["max_new_tokens"] == 6 for s in texts)
    assert job.comparisons_created + job.identical == 6 and job.comparisons_created >= 4


def test_every_refusal_stores_nothing(
    project: Any, manager: Any, annotator: Any, make_project: Any, pipes: tuple[Path, Path], tmp_path: Path
) -> None:
    base = _register(project, manager, pipes[0], "base")
    tuned = _register(project, manager, pipes[1], "tuned")
    versions = GeneratorVersion.objects.count()
    broken = tmp_path / "broken"
    shutil.copytree(pipes[0], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(Invalid, match="truncated") as exc:
        _register(project, manager, broken, "broken")
    assert exc.value.code == "bad_model"
    with pytest.raises(Invalid) as exc:
        services.generator_model_register(
            project=project,
            actor=manager,
            generator="lm",
            version="x",
            path=str(tiny_causal_lm(tmp_path / "lm")),
        )
    assert exc.value.code == "wrong_modality"
    with pytest.raises(Forbidden):
        _register(project, annotator, pipes[0], "mine")
    assert GeneratorVersion.objects.count() == versions

    first = Sample.objects.filter(project=project).first()
    assert first is not None and first.generator_version is not None
    uploaded = first.generator_version
    other = make_project("other", modality="image")
    elsewhere = _register(other, manager, pipes[0], "elsewhere")
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"version_id": uploaded.id}, Invalid, "bad_version"),
        ({"version_id": elsewhere.id}, NotFound, ""),
        ({"version_id": 10**9}, NotFound, ""),
        ({"incumbent_id": tuned.id}, Invalid, "bad_config"),  # itself
        ({"within_pairs": 2}, Invalid, "bad_config"),  # 2 outputs make one pair
        ({"incumbent_id": None, "within_pairs": 0}, Invalid, "bad_config"),
        ({"prompts": 0}, Invalid, "bad_config"),
        ({"render": {"per_prompt": 0}}, Invalid, "bad_config"),
        ({"render": {"steps": "2"}}, Invalid, "bad_config"),
        ({"round": 0}, Invalid, "bad_config"),
    ]
    for change, error, code in cases:
        kwargs: dict[str, Any] = {
            "version_id": tuned.id,
            "incumbent_id": base.id,
            "prompts": 2,
            "within_pairs": 1,
            "render": RENDER,
            **change,
        }
        with pytest.raises(error) as refused:
            services.sampling_job_create(project=project, actor=manager, dispatch=False, **kwargs)
        assert getattr(refused.value, "code", None) == (code or getattr(refused.value, "code", None)), change
    ranked = make_project("ranked", modality="image", mode="ranking", k=3)
    ranked_v = _register(ranked, manager, pipes[0], "r")
    with pytest.raises(Invalid) as exc:
        services.sampling_job_create(project=ranked, actor=manager, version_id=ranked_v.id, dispatch=False)
    assert exc.value.code == "not_pairwise"
    with pytest.raises(Invalid) as exc:
        services.sampling_job_create(
            project=other, actor=manager, version_id=elsewhere.id, within_pairs=1, dispatch=False
        )
    assert exc.value.code == "no_prompts"
    with pytest.raises(Forbidden):
        services.sampling_job_create(project=project, actor=annotator, version_id=tuned.id, dispatch=False)
    assert SamplingJob.objects.count() == 0


def test_a_model_gone_after_registration_fails_the_job_with_its_reason(
    project: Any, manager: Any, tmp_path: Path
) -> None:
    gone = _register(project, manager, tiny_sd_pipeline(tmp_path / "gone"), "gone")
    job = services.sampling_job_create(
        project=project,
        actor=manager,
        version_id=gone.id,
        prompts=2,
        within_pairs=1,
        render=RENDER,
        dispatch=False,
    )
    before = Sample.objects.count()
    shutil.rmtree(tmp_path / "gone" / "unet")
    job = services.sampling_job_render(job_id=job.id)
    assert job.status == "failed" and "component 'unet'" in job.error
    assert Sample.objects.count() == before
    assert services.sampling_job_queue(job_id=job.id).comparisons_created == 0


def test_an_rl_job_with_feedback_queues_its_last_checkpoint_against_the_base(
    project: Any, manager: Any, pipes: tuple[Path, Path]
) -> None:
    config = {
        "pipeline": str(pipes[0]),
        "iterations": 2,
        "prompts_per_iteration": 2,
        "images_per_prompt": 2,
        "sample_steps": 2,
        "train_batch_size": 2,
        "guidance_scale": 1.0,
        "learning_rate": 0.05,
    }
    with pytest.raises(Invalid) as exc:  # feedback a sampling job would refuse: nothing stored
        services.rl_job_create(
            project=project,
            actor=manager,
            algorithm="ddpo",
            config=config,
            feedback={"prompts": 0},
            dispatch=False,
        )
    assert exc.value.code == "bad_config" and RLJob.objects.count() == 0
    job = services.rl_job_create(
        project=project,
        actor=manager,
        algorithm="ddpo",
        config=config,
        feedback={"prompts": 2, "within_pairs": 1, "render": RENDER},
        dispatch=False,
    )
    assert job.base_version is not None and job.base_version.checkpoint == str(pipes[0])
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    sampling = SamplingJob.objects.get(rl_job=job)
    assert sampling.incumbent_id == job.base_version_id
    assert sampling.version.checkpoint == job.checkpoints[-1]
    assert sampling.version.metadata["base"] == str(pipes[0]) and sampling.version.metadata["adapter"]
    sampling = _run(sampling)
    # The LoRA checkpoint renders on its base: its images differ from the base's.
    assert sampling.samples_created == 8 and sampling.identical == 0
    assert sampling.comparisons_created == 6


# --- REST -------------------------------------------------------------------------------------------
def test_register_and_sample_over_rest(
    project: Any, manager: Any, annotator: Any, pipes: tuple[Path, Path]
) -> None:
    from tests.factories import client_for

    api, member = client_for(manager), client_for(annotator)
    url = f"/api/projects/{project.slug}/generator-versions/"
    r = api.post(url, {"generator": "sd", "version": "base", "path": str(pipes[0])}, format="json")
    assert r.status_code == 201, r.content
    base = r.json()
    assert (base["kind"], base["modality"], base["adapter"], base["checkpoint"]) == (
        "unet",
        "image",
        False,
        str(pipes[0]),
    )
    tuned = api.post(
        url, {"generator": "sd", "version": "tuned", "path": str(pipes[1])}, format="json"
    ).json()
    seen = member.get(url).json()["versions"]
    assert [v["version"] for v in seen] == ["tuned", "base"] and "checkpoint" not in seen[0]  # paths: staff
    r = member.post(url, {"generator": "sd", "version": "x", "path": str(pipes[0])}, format="json")
    assert r.status_code == 403
    for bad, message in [
        ({"generator": "sd", "version": "y", "path": "/nowhere"}, "no such directory"),
        ({"generator": "sd", "version": "y", "path": "/a\u0000b"}, "NUL"),
        ({"generator": "sd", "version": "y"}, "path"),
    ]:
        r = api.post(url, bad, format="json")
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.content
    assert len(api.get(url).json()["versions"]) == 2

    jobs = f"/api/projects/{project.slug}/sampling-jobs/"
    body: dict[str, Any] = {
        "version": tuned["id"],
        "incumbent": base["id"],
        "prompts": 2,
        "within_pairs": 1,
        "render": RENDER,
    }
    r = api.post(jobs, body, format="json")
    assert r.status_code == 202, r.content
    job = r.json()
    assert (job["status"], job["round"], job["total"], job["prompts"]) == ("queued", 1, 8, 2)
    _run(SamplingJob.objects.get(id=job["id"]))
    done = member.get(f"{jobs}{job['id']}/").json()
    assert (done["status"], done["comparisons_created"], done["done"]) == ("succeeded", 6, 8)
    assert [j["id"] for j in member.get(jobs).json()["jobs"]] == [job["id"]]
    assert member.post(jobs, body, format="json").status_code == 403
    changes: list[tuple[dict[str, Any], int]] = [
        ({"version": 10**9}, 404),
        ({"render": {"steps": 0}}, 400),
        ({"prompts": "x"}, 400),
    ]
    for change, code in changes:
        assert api.post(jobs, {**body, **change}, format="json").status_code == code, change
    assert api.get(f"{jobs}999999/").status_code == 404
    assert SamplingJob.objects.count() == 1


def test_a_model_text_with_nul_is_stored_with_replacement_characters() -> None:
    """Model output is untrusted: a byte-level tokenizer can decode to NUL, which a sample (and
    PostgreSQL's text) refuses; the renderer keeps the output with U+FFFD in its place."""
    from training.ml.render import storable_text

    assert storable_text("a\x00b\x00") == "a\ufffdb\ufffd"
    assert storable_text("### ok\n- fine") == "### ok\n- fine"
