"""Procedural demo media: pure functions, no database."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from simulate.generators import DEMO_PROMPTS, compose_text, draw_image, render_clip

IMAGE_PROMPT = "a red circle above a green mountain at sunset"
CLIP_PROMPT = "a red ball bouncing on a blue floor"
XSS = '<script>alert("xss")</script>'


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def _sharpness(arr: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours, over the grey image."""
    grey = arr.mean(axis=2)
    return float(np.abs(np.diff(grey, axis=1)).mean())


@pytest.mark.parametrize("size", [64, 256])
def test_draw_image_is_a_png_of_the_requested_size(size):
    png = draw_image(IMAGE_PROMPT, seed=1, size=size)

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG"
    assert img.size == (size, size)


def test_draw_image_is_deterministic():
    assert draw_image(IMAGE_PROMPT, seed=3) == draw_image(IMAGE_PROMPT, seed=3)
    assert draw_image(IMAGE_PROMPT, seed=3, style="noisy") == draw_image(IMAGE_PROMPT, seed=3, style="noisy")


def test_draw_image_depends_on_seed_and_prompt():
    base = _pixels(draw_image(IMAGE_PROMPT, seed=1))

    other_seed = _pixels(draw_image(IMAGE_PROMPT, seed=2))
    other_prompt = _pixels(draw_image("three green trees beside a lake", seed=1))

    assert np.abs(base - other_seed).mean() > 2.0
    assert np.abs(base - other_prompt).mean() > 10.0


def test_draw_image_uses_the_colour_in_the_prompt():
    red = _pixels(draw_image("a red square", seed=5))
    blue = _pixels(draw_image("a blue square", seed=5))

    def count(arr, rgb):
        return int((np.abs(arr - np.array(rgb, dtype=np.float32)).sum(axis=2) < 30).sum())

    assert count(red, (214, 40, 40)) > 500
    assert count(red, (40, 90, 210)) == 0
    assert count(blue, (40, 90, 210)) > 500
    assert count(blue, (214, 40, 40)) == 0


def test_noisy_style_is_clearly_worse_than_clean():
    clean = _pixels(draw_image(IMAGE_PROMPT, seed=1, style="clean"))
    noisy = _pixels(draw_image(IMAGE_PROMPT, seed=1, style="noisy"))

    assert np.abs(clean - noisy).mean() > 8.0
    # Clean is flat colour with crisp edges; noisy is grain everywhere (neighbours differ a lot).
    assert _sharpness(clean) < 2.0
    assert _sharpness(noisy) > 3 * _sharpness(clean)


def test_draw_image_refuses_an_unknown_style():
    with pytest.raises(ValueError, match="style"):
        draw_image(IMAGE_PROMPT, seed=1, style="fancy")


@pytest.mark.parametrize("style", ["clean", "noisy"])
def test_render_clip_decodes_with_the_expected_frames(style):
    mp4 = render_clip(CLIP_PROMPT, seed=1, size=96, seconds=1.5, fps=12, style=style)

    assert mp4[4:8] == b"ftyp"
    assert len(mp4) < 200_000
    # faststart: the index comes before the media data.
    assert mp4.index(b"moov") < mp4.index(b"mdat")
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f for f in container.decode(stream)]
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(frames) == 18
    assert (frames[0].width, frames[0].height) == (96, 96)


def test_render_clip_default_is_small_and_moves():
    mp4 = render_clip(CLIP_PROMPT, seed=2)

    assert len(mp4) < 200_000
    with av.open(io.BytesIO(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]
        duration = float(container.duration) / av.time_base
    assert len(frames) == 48
    assert frames[0].shape == (160, 160, 3)
    assert duration == pytest.approx(2.0, abs=0.1)
    assert np.abs(frames[0] - frames[12]).mean() > 0.5  # the ball moved


def test_render_clip_refuses_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        render_clip(CLIP_PROMPT, seed=1, size=97)


@pytest.mark.parametrize("prompt", DEMO_PROMPTS["text"])
def test_compose_text_is_non_empty_and_deterministic(prompt):
    clean = compose_text(prompt, seed=4)
    noisy = compose_text(prompt, seed=4, style="noisy")

    assert len(clean.strip()) > 100
    assert len(noisy.strip()) > 100
    assert clean == compose_text(prompt, seed=4)
    assert noisy == compose_text(prompt, seed=4, style="noisy")
    assert clean != noisy


def test_compose_text_varies_with_seed():
    prompt = DEMO_PROMPTS["text"][0]
    answers = {compose_text(prompt, seed=s) for s in range(10)}

    assert len(answers) > 1


def test_one_text_prompt_carries_a_script_tag_in_prose():
    carriers = [p for p in DEMO_PROMPTS["text"] if XSS in compose_text(p, seed=0)]

    assert len(carriers) == 1
    answer = compose_text(carriers[0], seed=0)
    # In prose, not hidden in a code block or a code span.
    line = next(line for line in answer.splitlines() if XSS in line)
    assert not line.startswith("```")
    assert f"`{XSS}`" not in line
    assert XSS in compose_text(carriers[0], seed=0, style="noisy")


def test_demo_prompts_cover_each_modality():
    assert set(DEMO_PROMPTS) == {"image", "video", "text"}
    for prompts in DEMO_PROMPTS.values():
        assert len(prompts) == 8
        assert len(set(prompts)) == 8
