"""Flow-GRPO and video GRPO as jobs: launched on tiny flow-matching pipelines (SD3-like, Wan-like),
run to the end with their checkpoints registered as LoRA generator versions on their base, and
their feedback rendered (PNGs; MP4s through PyAV) and queued against the base; algorithms that do
not fit the pipeline or the project refused with nothing stored."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import av
import pytest

from annotate.errors import Invalid
from annotate.models import Comparison, GeneratorVersion, Sample
from simulate.tiny_models import tiny_causal_lm, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_wan_pipeline
from training import services
from training.models import RLJob, SamplingJob

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-pipes")
    return {
        "sd": tiny_sd_pipeline(root / "sd", seed=0),
        "sd3": tiny_sd3_pipeline(root / "sd3", seed=0),
        "wan": tiny_wan_pipeline(root / "wan", seed=0),
        "gpt2": tiny_causal_lm(root / "gpt2"),
    }


def _config(pipeline: Path, **kw: Any) -> dict[str, Any]:
    return {
        "pipeline": str(pipeline), "iterations": 2, "prompts_per_iteration": 1, "group_size": 2,
        "sample_steps": 2, "train_batch_size": 2, "guidance_scale": 1.0, "learning_rate": 0.05,
        "checkpoint_every": 1, **kw,
    }  # fmt: skip


def _run_feedback(job: RLJob) -> SamplingJob:
    sampling = SamplingJob.objects.get(rl_job=job)
    sampling = services.sampling_job_render(job_id=sampling.id)
    assert sampling.status == "rendered", sampling.error
    return services.sampling_job_queue(job_id=sampling.id)


def test_a_flow_grpo_job_registers_lora_versions_and_its_feedback_renders_pngs(
    project: Any, manager: Any, pipes: dict[str, Path]
) -> None:
    job = services.rl_job_create(
        project=project, actor=manager, algorithm="flow_grpo", config=_config(pipes["sd3"], reward="pairwise"),
        feedback={"prompts": 2, "within_pairs": 1, "render": {"per_prompt": 2, "steps": 2, "guidance_scale": 1.0}},
        dispatch=False,
    )  # fmt: skip
    assert job.base_version is not None and job.base_version.metadata["kind"] == "flow"
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert [m["iteration"] for m in job.metrics] == [1.0, 2.0]
    assert all(m["first_ratio_error"] == 0.0 for m in job.metrics)
    versions = list(GeneratorVersion.objects.filter(metadata__rl_job=job.id).order_by("id"))
    assert [v.name for v in versions] == [f"job{job.id}-checkpoint-1", f"job{job.id}-checkpoint-2"]
    assert all(v.metadata["adapter"] and v.metadata["base"] == str(pipes["sd3"]) for v in versions)
    assert all(v.metadata["kind"] == "flow" and v.metadata["modality"] == "image" for v in versions)
    sampling = _run_feedback(job)
    new = Sample.objects.filter(id__in=[s for _, _, s in sampling.outputs["new"]])
    assert new.count() == 4 and all(str(s.media.name).endswith(".png") for s in new)
    assert sampling.comparisons_created == 4 + 2  # new vs base on each prompt and seed; one pair per group
    assert sampling.identical == 0  # the adapter changed what the base renders


def test_a_video_grpo_job_trains_on_frames_and_its_feedback_renders_mp4s(
    video_project: Any, manager: Any, pipes: dict[str, Path]
) -> None:
    render = {"per_prompt": 2, "steps": 2, "guidance_scale": 1.0, "resolution": 16, "frames": 9, "fps": 8}
    job = services.rl_job_create(
        project=video_project, actor=manager, algorithm="video_grpo",
        config=_config(pipes["wan"], frames=9, resolution=16),
        feedback={"prompts": 1, "within_pairs": 1, "render": render}, dispatch=False,
    )  # fmt: skip
    job = services.rl_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    assert all(m["first_ratio_error"] == 0.0 for m in job.metrics)
    last = GeneratorVersion.objects.get(name=f"job{job.id}-checkpoint-2")
    assert last.metadata["kind"] == "video" and last.metadata["modality"] == "video"
    sampling = _run_feedback(job)
    new = Sample.objects.filter(id__in=[s for _, _, s in sampling.outputs["new"]])
    assert new.count() == 2
    for sample in new:
        assert str(sample.media.name).endswith(".mp4") and sample.metadata["render"]["frames"] == 9
        with av.open(sample.media.path) as clip:  # a real H.264 file with every rendered frame
            assert clip.streams.video[0].codec_context.name == "h264"
            assert sum(1 for _ in clip.decode(video=0)) == 9
    queued = Comparison.objects.filter(project=video_project, origin="loop", origin_round=sampling.round)
    assert queued.count() == sampling.comparisons_created == 2 + 1


@pytest.mark.parametrize(
    ("algorithm", "pipe", "message"),
    [
        ("ddpo", "sd3", "ddpo needs a UNet text-to-image pipeline"),
        ("diffusion_grpo", "sd3", "diffusion_grpo needs a UNet"),
        ("flow_grpo", "sd", "flow_grpo needs a flow-matching"),
        ("flow_grpo", "wan", "flow_grpo needs a flow-matching"),
        ("diffusion_grpo", "gpt2", "diffusion_grpo needs a UNet"),  # a text model through the diffusion path
        ("ddpo", "gpt2", "ddpo needs a UNet text-to-image pipeline"),
    ],
)
def test_an_algorithm_that_does_not_fit_the_pipeline_is_refused(
    project: Any, manager: Any, pipes: dict[str, Path], algorithm: str, pipe: str, message: str
) -> None:
    config = _config(pipes[pipe])
    if algorithm == "ddpo":
        config = {"pipeline": str(pipes[pipe])}
    elif algorithm == "diffusion_grpo":
        config = {"pipeline": str(pipes[pipe]), "group_size": 2}
    before = GeneratorVersion.objects.count()
    with pytest.raises(Invalid, match=message) as exc:
        services.rl_job_create(
            project=project, actor=manager, algorithm=algorithm, config=config, dispatch=False
        )
    assert exc.value.code == "bad_model"
    assert RLJob.objects.count() == 0 and GeneratorVersion.objects.count() == before


def test_video_grpo_on_an_image_project_is_refused(
    project: Any, manager: Any, pipes: dict[str, Path]
) -> None:
    with pytest.raises(Invalid, match="video_grpo trains video generators") as exc:
        services.rl_job_create(
            project=project, actor=manager, algorithm="video_grpo",
            config=_config(pipes["wan"], frames=9, resolution=16), dispatch=False,
        )  # fmt: skip
    assert exc.value.code == "wrong_modality" and RLJob.objects.count() == 0
