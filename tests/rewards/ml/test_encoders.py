"""Encoders on tiny random CLIP/SigLIP/BERT models and the real MiniLM, all on CPU and offline."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2Model

from rewards.ml.encoders import (
    Encoder,
    EncoderError,
    decode_video_frames,
    default_text_encoder_path,
    inspect_encoder,
    load_encoder,
)
from tests.rewards.ml.tiny_models import (
    BERT_DIM,
    CLIP_DIM,
    SIGLIP_DIM,
    save_tiny_bert,
    save_tiny_clip,
    save_tiny_siglip,
)

pytestmark: list[pytest.MarkDecorator] = []  # no database needed

SAVERS: dict[str, Callable[[Path], Path]] = {
    "clip": save_tiny_clip,
    "siglip": save_tiny_siglip,
    "bert": save_tiny_bert,
}
PROMPTS = [
    "a red car",
    "a photo of a cat sitting on a mat",
    "",
    "many words " * 200,  # longer than any text tower: must be truncated, not fail
    "x",
]
# Grey level of frame i in the test videos: far apart, so a decoded frame tells its index.
LEVEL_STEP = 20


def _level(i: int) -> int:
    return 10 + LEVEL_STEP * i


# --- Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models are all thread synchronisation: on a busy 2-core machine, 2 intra-op threads made
    # each small matmul ~100x slower than 1 thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    dirs = {name: save(root / name) for name, save in SAVERS.items()}
    dirs["minilm"] = default_text_encoder_path()
    return dirs


@pytest.fixture(scope="module")
def encoders(model_dirs: dict[str, Path]) -> dict[str, Encoder]:
    return {name: load_encoder(path) for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 40), (20, 64), (33, 31), (64, 64)]
    made = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    # Not RGB: the encoder converts.
    made.append(Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), mode="L"))
    made.append(Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA"))
    return made


def _write_video(path: Path, n: int, *, size: int = 32) -> Path:
    """n frames, frame i uniformly grey at level _level(i), lossless H.264 so the levels survive."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12, options={"qp": "0"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), _level(i), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "long": _write_video(root / "long.mp4", 12),
        "short": _write_video(root / "short.mp4", 3),
        # Matroska does not store a frame count in its header: the decoder counts first.
        "mkv": _write_video(root / "long.mkv", 12),
    }


def _frame_indices(frames: list[Image.Image]) -> list[int]:
    return [round((np.asarray(f, dtype=np.float32).mean() - _level(0)) / LEVEL_STEP) for f in frames]


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=-1)


# --- Inspecting -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "model_type", "dim"),
    [
        ("clip", "clip", "clip", CLIP_DIM),
        ("siglip", "siglip", "siglip", SIGLIP_DIM),
        ("bert", "text", "bert", BERT_DIM),
        ("minilm", "text", "bert", 384),
    ],
)
def test_inspect_describes_each_family(
    model_dirs: dict[str, Path], name: str, family: str, model_type: str, dim: int
) -> None:
    info = inspect_encoder(model_dirs[name])
    assert info.path == str(model_dirs[name].resolve())
    assert info.name == model_dirs[name].name
    assert (info.family, info.model_type, info.dim) == (family, model_type, dim)
    assert len(info.fingerprint) == 64
    assert int(info.fingerprint, 16) >= 0


def test_default_text_encoder_is_minilm() -> None:
    path = default_text_encoder_path()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_fingerprint_follows_the_weights_not_the_path(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(model_dirs["clip"], tmp_path / "elsewhere" / "other-name")
    original = inspect_encoder(model_dirs["clip"])
    copied = inspect_encoder(copy)
    assert copied.fingerprint == original.fingerprint
    assert copied.path != original.path
    assert copied.name == "other-name"

    assert inspect_encoder(model_dirs["siglip"]).fingerprint != original.fingerprint
    # Same architecture and config, one byte of the last tensor changed: a different model.
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert inspect_encoder(copy).fingerprint != original.fingerprint


# --- Images and texts -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_embed_images(encoders: dict[str, Encoder], images: list[Image.Image], name: str) -> None:
    encoder = encoders[name]
    assert encoder.supports("image")
    assert encoder.supports("video")
    assert not encoder.supports("text")

    batched = encoder.embed_images(images, batch_size=3)
    assert batched.shape == (len(images), encoder.info.dim)
    assert batched.dtype == np.float32
    np.testing.assert_allclose(_norms(batched), 1.0, atol=1e-5)
    one_by_one = np.concatenate([encoder.embed_images([image]) for image in images])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(encoder.embed_images(images, batch_size=3), batched)
    # Random images must not collapse onto one vector.
    assert len({tuple(np.round(row, 4)) for row in batched}) == len(images)
    assert encoder.embed_images([]).shape == (0, encoder.info.dim)


@pytest.mark.parametrize("name", ["clip", "siglip", "bert", "minilm"])
def test_embed_texts(encoders: dict[str, Encoder], name: str) -> None:
    encoder = encoders[name]
    batched = encoder.embed_texts(PROMPTS, batch_size=2)
    assert batched.shape == (len(PROMPTS), encoder.info.dim)
    assert batched.dtype == np.float32
    np.testing.assert_allclose(_norms(batched), 1.0, atol=1e-5)
    one_by_one = np.concatenate([encoder.embed_texts([text]) for text in PROMPTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(encoder.embed_texts(PROMPTS, batch_size=2), batched)
    assert len({tuple(np.round(row, 4)) for row in batched}) == len(PROMPTS)
    assert encoder.embed_texts([]).shape == (0, encoder.info.dim)


def test_reloading_gives_the_same_embeddings(
    model_dirs: dict[str, Path], encoders: dict[str, Encoder], images: list[Image.Image]
) -> None:
    again = load_encoder(model_dirs["clip"])
    np.testing.assert_array_equal(again.embed_images(images), encoders["clip"].embed_images(images))
    np.testing.assert_array_equal(again.embed_texts(PROMPTS), encoders["clip"].embed_texts(PROMPTS))


def test_text_encoders_embed_text_only(encoders: dict[str, Encoder], images: list[Image.Image]) -> None:
    for name in ("bert", "minilm"):
        assert encoders[name].supports("text")
        assert not encoders[name].supports("image")
        assert not encoders[name].supports("video")
        with pytest.raises(EncoderError, match="text encoder cannot embed images"):
            encoders[name].embed_images(images[:1])


def test_minilm_embeds_meaning(encoders: dict[str, Encoder]) -> None:
    cat, kitten, stocks = encoders["minilm"].embed_texts(
        ["a cat sits on the mat", "a kitten is on the rug", "stock prices fell sharply"]
    )
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_close(
    model_dirs: dict[str, Path], encoders: dict[str, Encoder], images: list[Image.Image], dtype: str
) -> None:
    half = load_encoder(model_dirs["clip"], dtype=dtype)
    assert half.model.dtype == getattr(torch, dtype)
    full = encoders["clip"]
    for got, want in [
        (half.embed_images(images), full.embed_images(images)),
        (half.embed_texts(PROMPTS), full.embed_texts(PROMPTS)),
    ]:
        assert got.dtype == np.float32
        np.testing.assert_allclose(_norms(got), 1.0, atol=1e-5)  # normalised in float32
        assert (got * want).sum(axis=1).min() > 0.98


# --- Videos -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "expected"),
    [(4, [1, 4, 7, 10]), (1, [6]), (3, [2, 6, 10]), (12, list(range(12))), (20, list(range(12)))],
)
def test_decode_video_frames_spreads_k_uniformly(
    videos: dict[str, Path], k: int, expected: list[int]
) -> None:
    frames = decode_video_frames(videos["long"], k)
    assert _frame_indices(frames) == expected
    assert all(frame.mode == "RGB" and frame.size == (32, 32) for frame in frames)


def test_decode_video_frames_from_a_file_object_and_without_a_frame_count(videos: dict[str, Path]) -> None:
    with videos["long"].open("rb") as handle:
        assert _frame_indices(decode_video_frames(handle, 4)) == [1, 4, 7, 10]
    with av.open(str(videos["mkv"])) as container:
        assert container.streams.video[0].frames == 0  # the header has no count to trust
    assert _frame_indices(decode_video_frames(videos["mkv"], 4)) == [1, 4, 7, 10]
    assert _frame_indices(decode_video_frames(videos["short"], 8)) == [0, 1, 2]


def test_decode_video_frames_refuses_what_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="could not decode video"):
        decode_video_frames(tmp_path / "missing.mp4", 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(EncoderError, match=r"garbage\.mp4"):
        decode_video_frames(garbage, 4)
    audio = tmp_path / "audio.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(EncoderError, match=r"audio\.wav has no video stream"):
        decode_video_frames(audio, 4)
    with pytest.raises(EncoderError, match="at least 1"):
        decode_video_frames(audio, 0)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_embed_videos_pads_short_videos(
    encoders: dict[str, Encoder], videos: dict[str, Path], name: str
) -> None:
    encoder = encoders[name]
    paths: list[str | Path] = [videos["long"], videos["short"], str(videos["mkv"])]
    # batch_size 3 puts frames of different videos in one batch and splits videos across batches.
    x, mask = encoder.embed_videos(paths, frames=4, batch_size=3)
    assert x.shape == (3, 4, encoder.info.dim)
    assert x.dtype == np.float32
    assert mask.dtype == np.bool_
    assert mask.tolist() == [[True] * 4, [True, True, True, False], [True] * 4]
    np.testing.assert_allclose(_norms(x[mask]), 1.0, atol=1e-5)
    np.testing.assert_array_equal(x[1, 3], 0.0)

    for row, path in enumerate(paths):
        frames = decode_video_frames(path, 4)
        np.testing.assert_allclose(x[row, : len(frames)], encoder.embed_images(frames), atol=1e-5)
    np.testing.assert_allclose(x[0], x[2], atol=1e-5)  # the same frames in two containers

    empty_x, empty_mask = encoder.embed_videos([], frames=4)
    assert empty_x.shape == (0, 4, encoder.info.dim)
    assert empty_mask.shape == (0, 4)


# --- Errors -----------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=f"encoder directory {tmp_path}/nope does not exist"):
        inspect_encoder(tmp_path / "nope")
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "nope")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        EncoderError, match=f"{tmp_path} has no config.json: not a transformers model directory"
    ):
        inspect_encoder(tmp_path)


def test_unsupported_model_type(tmp_path: Path) -> None:
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=100, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(
        tmp_path
    )
    with pytest.raises(EncoderError, match=r"model_type 'gpt2' is not a supported encoder \(bert, clip"):
        inspect_encoder(tmp_path)
    with pytest.raises(EncoderError, match="'gpt2' is not a supported encoder"):
        load_encoder(tmp_path)


def test_missing_tokenizer_or_image_processor(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    no_processor = shutil.copytree(model_dirs["clip"], tmp_path / "no-processor")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(EncoderError, match=r"has no preprocessor_config\.json"):
        inspect_encoder(no_processor)
    no_tokenizer = shutil.copytree(model_dirs["bert"], tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(EncoderError, match="has no tokenizer files"):
        inspect_encoder(no_tokenizer)
    no_weights = shutil.copytree(model_dirs["bert"], tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match=r"has no weight files \(\*.safetensors or \*.bin\)"):
        inspect_encoder(no_weights)


def test_truncated_weights_are_caught_without_loading(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    # A download cut short: the safetensors header promises more bytes than the file has. Cheap to
    # check, so inspect_encoder (at job launch) refuses it already.
    broken = shutil.copytree(model_dirs["clip"], tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(
        EncoderError, match=r"model.safetensors is truncated: \d+ bytes, its header needs \d+"
    ):
        inspect_encoder(broken)
    with pytest.raises(EncoderError, match="is truncated"):
        load_encoder(broken)

    weights.write_bytes(b"\xff" * 100)
    with pytest.raises(EncoderError, match=r"model\.safetensors: not a valid safetensors file"):
        inspect_encoder(broken)


def test_weights_that_do_not_fit_the_model_fail_at_load(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    # A well-formed file with the wrong tensors passes the cheap inspection; loading must still refuse
    # it instead of silently initialising layers at random.
    tensors = load_file(model_dirs["bert"] / "model.safetensors")
    wrong_shape = shutil.copytree(model_dirs["bert"], tmp_path / "wrong-shape")
    save_file(
        {**tensors, "embeddings.word_embeddings.weight": torch.zeros(10, BERT_DIM)},
        wrong_shape / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert inspect_encoder(wrong_shape).dim == BERT_DIM
    with pytest.raises(EncoderError, match=f"{wrong_shape}: weights could not be loaded: .*mismatched_sizes"):
        load_encoder(wrong_shape)

    missing = shutil.copytree(model_dirs["bert"], tmp_path / "missing")
    key = "encoder.layer.0.attention.self.query.weight"
    save_file(
        {k: v for k, v in tensors.items() if k != key},
        missing / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(EncoderError, match=f"{missing}: weights could not be loaded: missing {key}"):
        load_encoder(missing)


def test_bad_dtype_and_device(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(EncoderError, match="unknown dtype 'float64': use one of float32, float16, bfloat16"):
        load_encoder(model_dirs["clip"], dtype="float64")
    with pytest.raises(EncoderError, match="unknown device 'gpu0'"):
        load_encoder(model_dirs["clip"], device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            load_encoder(model_dirs["clip"], device="cuda")


# --- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_float16_on_cuda_agrees_with_float32_on_cpu(
    model_dirs: dict[str, Path],
    encoders: dict[str, Encoder],
    images: list[Image.Image],
    videos: dict[str, Path],
) -> None:
    gpu = load_encoder(model_dirs["clip"], device="cuda", dtype="float16")
    assert gpu.model.dtype == torch.float16
    assert gpu.model.device.type == "cuda"
    cpu = encoders["clip"]
    for got, want in [
        (gpu.embed_images(images), cpu.embed_images(images)),
        (gpu.embed_texts(PROMPTS), cpu.embed_texts(PROMPTS)),
        (
            gpu.embed_videos([videos["long"]], frames=4)[0][0],
            cpu.embed_videos([videos["long"]], frames=4)[0][0],
        ),
    ]:
        assert got.dtype == np.float32
        np.testing.assert_allclose(_norms(got), 1.0, atol=1e-4)
        np.testing.assert_allclose(got, want, atol=2e-2)
