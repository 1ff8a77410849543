"""RL jobs in the app: launch refusals with nothing recorded, a DDPO job run on the project's
active reward model with per-step metrics on the row and every checkpoint registered as a
generator version (loadable with plain diffusers), cancel, and resume after a lost worker."""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import pytest

from annotate.errors import Conflict, Invalid
from annotate.models import GeneratorVersion
from rewards.models import RewardModelVersion
from tests.training.ml.test_ddpo import _pipeline_dir
from training import services
from training.models import RLJob

pytestmark = pytest.mark.django_db

DDPO = {
    "iterations": 2,
    "prompts_per_iteration": 2,
    "images_per_prompt": 2,
    "sample_steps": 3,
    "train_batch_size": 2,
    "guidance_scale": 1.0,
    "checkpoint_every": 1,
}


def _config(**kw: Any) -> dict[str, Any]:
    return {"pipeline": str(_pipeline_dir()), **DDPO, **kw}


@pytest.mark.parametrize(
    ("algorithm", "config", "code"),
    [
        ("ppo", {}, "bad_algorithm"),
        ("text_grpo", {"policy": "/nonexistent"}, "wrong_modality"),
        ("ddpo", {"eta": 0.0}, "bad_config"),
        ("ddpo", {"nonsense": 1}, "bad_config"),
        ("ddpo", {"iterations": "2"}, "bad_config"),
        ("ddpo", {"pipeline": "/nonexistent"}, "bad_model"),
    ],
)
def test_every_launch_refusal_records_nothing(
    project: Any, manager: Any, algorithm: str, config: dict[str, Any], code: str
) -> None:
    with pytest.raises(Invalid) as exc:
        services.rl_job_create(
            project=project, actor=manager, algorithm=algorithm, config=_config(**config), dispatch=False
        )
    assert exc.value.code == code
    assert RLJob.objects.count() == 0


def test_a_pipeline_of_the_wrong_kind_and_a_project_without_a_reward_model_are_refused(
    project: Any, manager: Any, make_project: Any, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")  # a transformers directory, not a pipeline
    with pytest.raises(Invalid, match="ddpo needs a UNet text-to-image pipeline"):
        services.rl_job_create(
            project=project,
            actor=manager,
            algorithm="ddpo",
            config=_config(pipeline=str(tmp_path)),
            dispatch=False,
        )
    bare = make_project("bare", modality="image")
    with pytest.raises(Invalid) as exc:
        services.rl_job_create(
            project=bare, actor=manager, algorithm="ddpo", config=_config(), dispatch=False
        )
    assert exc.value.code == "no_prompts"
    assert RLJob.objects.count() == 0


def test_an_annotator_cannot_launch(project: Any, annotator: Any) -> None:
    with pytest.raises(Exception, match="manager"):
        services.rl_job_create(
            project=project, actor=annotator, algorithm="ddpo", config=_config(), dispatch=False
        )
    assert RLJob.objects.count() == 0


def test_a_ddpo_job_runs_stores_its_metrics_and_registers_every_checkpoint(
    project: Any, manager: Any
) -> None:
    from diffusers import StableDiffusionPipeline

    job = services.rl_job_create(
        project=project, actor=manager, algorithm="ddpo", config=_config(), dispatch=False
    )
    assert job.status == "queued" and job.total_steps == 2
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert job.step == 2 and [m["iteration"] for m in job.metrics] == [1.0, 2.0]
    assert all(m["first_ratio_error"] == 0.0 for m in job.metrics)
    assert [Path(c).name for c in job.checkpoints] == ["checkpoint-1", "checkpoint-2"]
    versions = GeneratorVersion.objects.filter(generator__name=f"{project.slug}-rl").order_by("name")
    assert [v.name for v in versions] == [f"job{job.id}-checkpoint-1", f"job{job.id}-checkpoint-2"]
    assert all(not v.is_external and v.metadata["rl_job"] == job.id for v in versions)
    pipe = StableDiffusionPipeline.from_pretrained(str(_pipeline_dir()), local_files_only=True)
    last = versions.last()
    assert last is not None
    pipe.load_lora_weights(last.checkpoint)
    # Run again: a finished job is left as it is.
    assert services.rl_job_run(job_id=job.id).metrics == job.metrics


def test_a_job_whose_worker_died_resumes_from_its_last_checkpoint(project: Any, manager: Any) -> None:
    job = services.rl_job_create(
        project=project, actor=manager, algorithm="ddpo", config=_config(iterations=3), dispatch=False
    )
    first = services.rl_job_run(job_id=job.id)
    assert first.status == "succeeded"
    # As if the worker had died during iteration 3, after checkpoint-2: the row still says running
    # and holds iteration 3's metrics, checkpoint-3 is gone.
    shutil.rmtree(Path(first.output_dir) / "checkpoint-3")
    RLJob.objects.filter(id=job.id).update(status="running", metrics=first.metrics, step=3)
    again = services.rl_job_run(job_id=job.id)
    assert again.status == "succeeded"
    assert [m["iteration"] for m in again.metrics] == [1.0, 2.0, 3.0]
    same = ("reward_mean", "loss", "approx_kl", "clip_fraction")
    assert {k: again.metrics[2][k] for k in same} == {k: first.metrics[2][k] for k in same}  # exactly


def test_cancel(project: Any, manager: Any) -> None:
    job = services.rl_job_create(
        project=project, actor=manager, algorithm="ddpo", config=_config(), dispatch=False
    )
    job = services.rl_job_cancel(job=job, actor=manager)
    assert job.status == "cancelled"
    assert services.rl_job_run(job_id=job.id).status == "cancelled"  # never started
    with pytest.raises(Conflict):
        services.rl_job_cancel(job=job, actor=manager)


# --- REST -------------------------------------------------------------------------------------------
def test_launch_watch_and_cancel_over_rest(project: Any, manager: Any, annotator: Any) -> None:
    from tests.factories import client_for

    api = client_for(manager)
    url = f"/api/projects/{project.slug}/rl-jobs/"
    r = api.post(url, {"algorithm": "ddpo", "config": _config()}, format="json")
    assert r.status_code == 202, r.content
    job = r.json()
    assert (
        job["status"] == "queued" and job["total_steps"] == 2 and job["config"]["pipeline"]
    )  # staff sees paths
    assert job["reward_model"] == RewardModelVersion.objects.get(project=project, is_active=True).number
    assert api.get(f"{url}{job['id']}/").json()["id"] == job["id"]
    assert [j["id"] for j in api.get(url).json()["jobs"]] == [job["id"]]
    # Members read; the model directory on the server is for staff only.
    seen = client_for(annotator).get(f"{url}{job['id']}/").json()
    assert "pipeline" not in seen["config"] and "checkpoints" not in seen
    r = client_for(annotator).post(f"{url}{job['id']}/cancel/")
    assert r.status_code == 403
    r = api.post(f"{url}{job['id']}/cancel/")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert api.post(f"{url}{job['id']}/cancel/").status_code == 409
    assert api.get(f"{url}999999/").status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"algorithm": "ppo", "config": {}}, "algorithm"),
        ({"algorithm": "ddpo", "config": "fast"}, "config"),
        ({"algorithm": "ddpo", "config": {"pipeline": "/x\u0000y"}}, "config.pipeline: contains a NUL"),
        ({"algorithm": "ddpo", "config": {"pipeline": "/" + "a" * 5000}}, "config.pipeline"),
        ({"algorithm": "ddpo", "config": {"lora_rank": 10**30}}, "config.lora_rank"),
        ({"algorithm": "ddpo", "config": {"pipeline": "/p", "eta": 0}}, "config: eta must be in"),
        ({"algorithm": "text_grpo", "config": {}}, "trains text generators"),
    ],
)
def test_bad_launches_over_rest_are_400s_with_nothing_stored(
    project: Any, manager: Any, body: dict[str, Any], message: str
) -> None:
    from tests.factories import client_for

    r = client_for(manager).post(f"/api/projects/{project.slug}/rl-jobs/", body, format="json")
    assert r.status_code == 400, r.content
    assert message in r.json()["error"]["message"], r.json()  # our error shape, the field named
    assert RLJob.objects.count() == 0


# --- A text job -------------------------------------------------------------------------------------
def _text_config(**kw: Any) -> dict[str, Any]:
    from tests.training.ml.test_text_grpo import _policy

    return {"policy": str(_policy()), "steps": 2, "prompts_per_step": 2, "num_generations": 2,
            "max_completion_length": 6, **kw}  # fmt: skip


def test_a_text_grpo_job_runs_on_the_text_reward_model_and_a_cancel_stops_it(
    text_project: Any, manager: Any
) -> None:
    job = services.rl_job_create(
        project=text_project, actor=manager, algorithm="text_grpo", config=_text_config(), dispatch=False
    )
    done = services.rl_job_run(job_id=job.id)
    assert done.status == "succeeded", done.error
    assert [m["step"] for m in done.metrics] == [1.0, 2.0] and done.step == 2
    assert [Path(c).name for c in done.checkpoints] == ["final"]
    assert GeneratorVersion.objects.filter(generator__name="txt-rl", name=f"job{job.id}-final").exists()
    # A cancel that arrives while a job runs: it stops after the step it is in, saves, and says so.
    other = services.rl_job_create(
        project=text_project,
        actor=manager,
        algorithm="text_rloo",
        config=_text_config(steps=5),
        dispatch=False,
    )
    RLJob.objects.filter(id=other.id).update(status="running", cancel_requested=True)
    stopped = services.rl_job_run(job_id=other.id)
    assert stopped.status == "cancelled" and stopped.step == 1, stopped.error


def test_the_metrics_plot_over_rest(project: Any, manager: Any, annotator: Any) -> None:
    import xml.etree.ElementTree as ET

    from tests.factories import client_for

    job = services.rl_job_create(
        project=project, actor=manager, algorithm="ddpo", config=_config(), dispatch=False
    )
    url = f"/api/projects/{project.slug}/rl-jobs/{job.id}/metrics.svg"
    empty = client_for(annotator).get(url)  # any member may look
    assert empty.status_code == 200 and "no steps yet" in empty.content.decode()
    job = services.rl_job_run(job_id=job.id)
    r = client_for(annotator).get(url)
    assert r.status_code == 200 and r["Content-Type"] == "image/svg+xml"
    doc = ET.fromstring(r.content)  # noqa: S314  (our own response) a well-formed standalone SVG document
    assert doc.tag == "{http://www.w3.org/2000/svg}svg"
    charts = doc.findall("{http://www.w3.org/2000/svg}g/{http://www.w3.org/2000/svg}svg")
    logged = {
        k for row in job.metrics for k, v in row.items() if k != "iteration" and isinstance(v, int | float)
    }
    assert len(charts) == len(logged) and len(job.metrics) == 2
    titles = [t.text for t in doc.iter("{http://www.w3.org/2000/svg}text")]
    assert titles[0] == f"RL job {job.id} (ddpo, succeeded): step 2 of 2" and titles[1] == "reward_mean"
