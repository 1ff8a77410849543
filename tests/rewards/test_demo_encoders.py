"""The seeded demo trains reward models out of the box: its project mixes images, videos and texts,
and with no encoder configured the built-in image-text CLIP (built under var/encoders on first use,
nothing downloaded) embeds all three into one space."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import override_settings
from PIL import Image

from annotate.models import Project, Sample
from rewards import services
from rewards.ml import builtin_encoder
from rewards.ml.encoders import inspect_encoder, load_encoder
from rewards.models import Encoder, RewardModelVersion, SampleEmbedding
from simulate import generators as demo_media
from tests.rewards.helpers import simulate


def test_builtin_encoder_is_deterministic_and_embeds_every_modality(tmp_path: Path) -> None:
    first = inspect_encoder(builtin_encoder.build_builtin_encoder(tmp_path / "a"))
    second = inspect_encoder(builtin_encoder.ensure_builtin_encoder(tmp_path / "root"))
    assert second.path == str((tmp_path / "root" / builtin_encoder.NAME).resolve())
    assert first.fingerprint == second.fingerprint  # same weights on every machine: a shared cache
    assert (first.family, first.model_type, first.dim) == ("clip", "clip", 64)
    assert first.modalities == ("image", "video", "text")
    # A second call reuses the directory as it is.
    assert builtin_encoder.ensure_builtin_encoder(tmp_path / "root") == Path(second.path)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [builtin_encoder.NAME]

    encoder = load_encoder(second.path)
    assert [encoder.supports(m) for m in ("image", "video", "text")] == [True, True, True]
    prompt = demo_media.DEMO_PROMPTS["video"][0]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(demo_media.render_clip(prompt, seed=0, size=64, seconds=0.5))
    video, mask = encoder.embed_videos([clip], frames=4)
    assert video.shape == (1, 4, 64) and mask.tolist() == [[True] * 4]
    text = encoder.embed_texts([demo_media.compose_text(demo_media.DEMO_PROMPTS["text"][0], seed=0)])
    assert text.shape == (1, 64)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)


def test_builtin_features_carry_colour_not_pixel_noise(tmp_path: Path) -> None:
    """The fixed patch filters make pooled features follow an image's colours and brightness: grainy
    copies of six flat colours land next to their own colour, and apart from the others."""
    encoder = load_encoder(builtin_encoder.ensure_builtin_encoder(tmp_path))
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 160, 70), (40, 90, 210), (245, 210, 40), (25, 25, 25), (245, 245, 245)]

    def flat(colour: tuple[int, int, int], grain: float) -> Image.Image:
        pixels = np.zeros((64, 64, 3)) + np.array(colour) + rng.normal(0, grain, (64, 64, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    clean = encoder.embed_images([flat(c, 0) for c in colours])
    grainy = encoder.embed_images([flat(c, 12) for c in colours])
    similarity = grainy @ clean.T
    assert similarity.argmax(axis=1).tolist() == [0, 1, 2, 3, 4, 5]
    # Measured: 1.000 to its own colour, at most 0.93 to another (yellow and white).
    assert similarity.diagonal().min() > 0.99
    assert (similarity - 2 * np.eye(6)).max() < 0.95


@pytest.mark.django_db
def test_seeded_demo_trains_a_reward_model_out_of_the_box(settings: Any) -> None:
    call_command("seed_demo", "--slug", "demo-rm", "--prompts", "3", stdout=io.StringIO())
    project = Project.objects.get(slug="demo-rm")
    assert project.modality == ""  # mixed
    assert sorted(set(Sample.objects.filter(project=project).values_list("modality", flat=True))) == [
        "image",
        "text",
        "video",
    ]
    demo = get_user_model().objects.get(username="demo")

    # The demo user judges: clean (v2) beats noisy (v1); two clean samples tie.
    def clean_wins(a: Sample, b: Sample) -> int | str:
        if a.metadata["style"] == b.metadata["style"]:
            return "tie"
        return a.id if a.metadata["style"] == "clean" else b.id

    assert simulate(project, demo, clean_wins, noise=0.0) == 27
    job = services.reward_job_create(
        project=project, actor=demo, holdout=0.3, hyperparameters={"epochs": 20}, dispatch=False
    )
    assert job.encoder.name == builtin_encoder.NAME
    assert job.encoder.modalities == ["image", "video", "text"]
    assert Path(job.encoder_path) == (Path(settings.VAR_DIR) / "encoders" / builtin_encoder.NAME).resolve()
    job = services.reward_job_run(job_id=job.id)
    assert job.status == "succeeded", job.error
    version = RewardModelVersion.objects.get(job=job)
    m = version.metrics
    assert m["train_pairs"] + m["holdout_pairs"] == 27 and m["holdout_pairs"] >= 1
    assert m["samples"] == 27
    assert m["holdout_accuracy"] is not None and 0.0 <= m["holdout_accuracy"] <= 1.0
    assert m["holdout"]["log_loss"] is not None and m["ece"] is not None
    assert version.is_active and version.decision["reason"] == "no active model yet"
    # Every sample is embedded under the one encoder: videos as 8 frames, images and texts as one.
    counts = dict(
        SampleEmbedding.objects.filter(sample__project=project)
        .values_list("sample__modality", "count")
        .distinct()
    )
    assert counts == {"image": 1, "video": 8, "text": 1}
    assert Encoder.objects.count() == 1


@pytest.mark.django_db
def test_a_real_encoder_directory_replaces_the_builtin_default(
    make_project: Any, manager: Any, tmp_path: Path
) -> None:
    """RL_DEFAULT_MEDIA_ENCODER names the default directory; blank turns the default off."""
    from annotate import services as annotate_services
    from annotate.errors import Invalid
    from tests.factories import png_bytes
    from tests.rewards.ml.tiny_models import save_tiny_clip

    project = make_project("imgs", modality="image")
    annotate_services.sample_create_media(
        project=project, actor=manager, file=io.BytesIO(png_bytes()), filename="x.png", prompt="p"
    )
    clip = save_tiny_clip(tmp_path / "clip")
    with override_settings(RL_DEFAULT_MEDIA_ENCODER=str(clip)):
        assert services.encoder_default_path(project) == str(clip)
    with (
        override_settings(RL_DEFAULT_MEDIA_ENCODER=""),
        pytest.raises(Invalid, match="no encoder configured"),
    ):
        services.encoder_default_path(project)
    with override_settings(RL_DEFAULT_MEDIA_ENCODER="builtin"):
        assert Path(services.encoder_default_path(project)).name == builtin_encoder.NAME
