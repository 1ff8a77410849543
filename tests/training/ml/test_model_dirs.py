"""Model directories checked from their files, and rendering from them: the kinds found in real
``save_pretrained`` directories, every kind of damage refused with a reason, and renders that are
a function of (prompt, seed, settings)."""

from __future__ import annotations

import json
import os
import shutil
import struct

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulate.tiny_models import tiny_causal_lm, tiny_sd_pipeline
from training.ml.model_dirs import ModelDirError, check_safetensors, inspect_model_dir, require_kind
from training.ml.render import RenderConfig, encode_mp4, load_generator, resolve


@pytest.fixture(scope="module")
def sd(tmp_path_factory: Any) -> Path:
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def lm(tmp_path_factory: Any) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("lm") / "policy")


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _flow_pipeline(tmp: Path, *, video: bool = False) -> Path:
    """The files of a flow-matching pipeline (SD3-like, or Wan-like with ``video``), weights
    written with safetensors: what the inspection reads."""
    import torch
    from safetensors.torch import save_file

    root = tmp / ("wan" if video else "sd3")
    cls = "WanPipeline" if video else "StableDiffusion3Pipeline"
    index = {
        "_class_name": cls,
        "_diffusers_version": "0.42.0",
        "transformer": ["diffusers", "WanTransformer3DModel" if video else "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLWan" if video else "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "tokenizer": ["transformers", "AutoTokenizer"],
    }
    for name in ("transformer", "vae"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2, 2)}, str(root / name / "diffusion_pytorch_model.safetensors"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "tokenizer").mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_the_kinds_of_real_directories(sd: Path, lm: Path, tmp_path: Path) -> None:
    info = inspect_model_dir(sd)
    assert (info.kind, info.modality, info.class_name, info.scheduler) == (
        "unet",
        "image",
        "StableDiffusionPipeline",
        "DDIMScheduler",
    )
    info = inspect_model_dir(lm)
    assert (info.kind, info.modality, info.class_name) == ("causal_lm", "text", "GPT2LMHeadModel")
    assert inspect_model_dir(_flow_pipeline(tmp_path)).kind == "flow"
    video = inspect_model_dir(_flow_pipeline(tmp_path, video=True))
    assert (video.kind, video.modality) == ("video", "video")


def test_a_peft_adapter_is_a_lora_on_the_base_it_names(lm: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(lm), local_files_only=True)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    peft.save_pretrained(str(tmp_path / "adapter"))
    info = inspect_model_dir(tmp_path / "adapter")
    assert info.kind == "lora" and info.base == str(lm)
    _adapter, base = resolve(str(tmp_path / "adapter"))
    assert base is not None and base.kind == "causal_lm"


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors", 5000), "truncated"),
        (lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors", 4), "not even a header"),
        (lambda d: shutil.rmtree(d / "vae"), r"component 'vae' \(AutoencoderKL\) is missing"),
        (lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "text_encoder" / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "model_index.json").write_text("{not json"), "unreadable JSON"),
        (lambda d: (d / "model_index.json").write_text("[1]"), "not a JSON object"),
        (lambda d: (d / "model_index.json").write_text('{"unet": ["diffusers", "X"]}'), "no _class_name"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), "no scheduler_config.json"),
    ],
)
def test_a_damaged_pipeline_is_refused_with_the_reason(
    sd: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    d = _copy(sd, tmp_path)
    damage(d)
    with pytest.raises(ModelDirError, match=message):
        inspect_model_dir(d)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _truncate(d / "model.safetensors", 10_000), "truncated"),
        (lambda d: (d / "config.json").write_text('{"architectures": ["BertModel"]}'), "not a causal"),
        (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "no tokenizer"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    ],
)
def test_a_damaged_causal_lm_is_refused_with_the_reason(
    lm: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    d = _copy(lm, tmp_path)
    damage(d)
    with pytest.raises(ModelDirError, match=message):
        inspect_model_dir(d)


def test_a_truncated_torch_bin_and_bad_paths_are_refused(lm: Path, tmp_path: Path) -> None:
    import torch

    d = _copy(lm, tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(100, 100)}, str(d / "pytorch_model.bin"))
    assert inspect_model_dir(d).kind == "causal_lm"  # a whole .bin is fine
    _truncate(d / "pytorch_model.bin", 3000)
    with pytest.raises(ModelDirError, match="truncated or not a torch checkpoint"):
        inspect_model_dir(d)
    with pytest.raises(ModelDirError, match="no such directory"):
        inspect_model_dir(tmp_path / "absent")
    with pytest.raises(ModelDirError, match="not a usable path"):
        inspect_model_dir("/tmp/a\x00b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="not a model directory"):
        inspect_model_dir(tmp_path / "empty")


def test_a_safetensors_header_that_promises_too_much_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    whole = struct.pack("<Q", len(header)) + header + b"\0" * 16
    (tmp_path / "ok.safetensors").write_bytes(whole)
    assert check_safetensors(tmp_path / "ok.safetensors") == 1
    (tmp_path / "short.safetensors").write_bytes(whole[:-1])
    with pytest.raises(ModelDirError, match="its header promises"):
        check_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ModelDirError, match="truncated or corrupt"):
        check_safetensors(tmp_path / "huge.safetensors")


def test_an_algorithm_names_what_it_needs(sd: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=r"ddpo needs a UNet text-to-image pipeline.*is a flow-matching"):
        require_kind(inspect_model_dir(_flow_pipeline(tmp_path)), ("unet",), what="ddpo")
    require_kind(inspect_model_dir(sd), ("unet",), what="ddpo")


def test_renders_are_a_function_of_prompt_seed_and_settings(sd: Path, lm: Path) -> None:
    import io

    from PIL import Image

    config = RenderConfig(steps=2, guidance_scale=2.0, batch_size=2)
    gen = load_generator(str(sd), config=config)
    out = gen.render(["a red square", "a blue circle", "a red square"], [0, 0, 1])
    again = gen.render(["a red square"], [0])  # alone, in a batch of one
    assert out[0].data == again[0].data and out[0].extension == "png"
    assert out[0].data != out[2].data  # another seed
    assert Image.open(io.BytesIO(out[0].data)).size == (32, 32)
    text = load_generator(str(lm), config=RenderConfig(max_new_tokens=8))
    a, b, c = text.render(["hello", "hello", "hello"], [3, 3, 4])
    assert a.text == b.text and a.text != c.text and not a.data


def test_a_video_is_an_mp4_the_app_accepts() -> None:
    import io

    from annotate.media import inspect_media

    frames = (np.random.default_rng(0).random((9, 17, 20, 3)) * 255).astype(np.uint8)
    info = inspect_media(io.BytesIO(encode_mp4(frames, fps=8)))
    assert (info.modality, info.frames, info.width, info.height) == ("video", 9, 20, 16)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"per_prompt": 0}, "per_prompt"),
        ({"resolution": 30}, "resolution"),
        ({"dtype": "float16"}, "float16 needs a GPU"),
        ({"device": "tpu"}, "device"),
        ({"steps": "20"}, "steps: expected int"),
        ({"nonsense": 1}, "unknown setting"),
    ],
)
def test_bad_render_settings_are_named(values: dict[str, Any], message: str) -> None:
    from training.ml.configs import ConfigError

    with pytest.raises(ConfigError, match=message):
        RenderConfig.from_dict(values)
