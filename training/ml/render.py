"""Rendering a generator's outputs for people to judge: images (PNG), videos (MP4) or texts from a
local model directory, with the pipeline's or model's own inference code (``pipeline(...)``,
``generate``), one seeded generator per output so that the same (prompt, seed, settings) renders
the same output again and two versions can be compared on the same starting noise.

A LoRA adapter (what RL jobs write) runs on its base model: ``load_generator(adapter, base=...)``
loads the base with ``from_pretrained`` and the adapter with diffusers' ``load_lora_weights`` or
peft's ``PeftModel.from_pretrained``, as a user would outside the app.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from training.ml.configs import DTYPES, ConfigError, config_from_dict, require
from training.ml.model_dirs import ModelDir, ModelDirError, inspect_model_dir


@dataclass
class RenderConfig:
    """How a sampling job renders: the same settings for every version it renders, recorded in each
    sample's metadata."""

    per_prompt: int = 2
    """Outputs per prompt and version, with seeds ``seed``, ``seed + 1``, ..."""
    seed: int = 0
    """The first seed; output i of every prompt is rendered from seed ``seed + i`` by every version."""
    steps: int = 20
    """Denoising steps (images and videos)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance (images and videos; 1.0: none)."""
    resolution: int = 0
    """Image or frame side in pixels; 0 takes the pipeline's default."""
    frames: int = 9
    """Frames per video."""
    fps: int = 8
    """Frames per second of a rendered video."""
    max_new_tokens: int = 64
    """Longest text completion, in tokens."""
    temperature: float = 1.0
    """Text sampling temperature."""
    top_p: float = 1.0
    """Text nucleus sampling."""
    batch_size: int = 8
    """Outputs rendered per forward pass."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``: set explicitly, never guessed."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (GPU)."""

    @classmethod
    def from_dict(cls, data: Any) -> RenderConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> RenderConfig:
        require(1 <= self.per_prompt <= 64, "per_prompt must be 1..64")
        require(0 <= self.seed < 2**31, "seed must be 0..2**31-1")
        require(1 <= self.steps <= 1000, "steps must be 1..1000")
        require(1.0 <= self.guidance_scale <= 50.0, "guidance_scale must be 1..50")
        require(
            self.resolution == 0 or (16 <= self.resolution <= 4096 and self.resolution % 8 == 0),
            "resolution must be 0 or a multiple of 8 in 16..4096",
        )
        require(1 <= self.frames <= 512, "frames must be 1..512")
        require(1 <= self.fps <= 120, "fps must be 1..120")
        require(1 <= self.max_new_tokens <= 8192, "max_new_tokens must be 1..8192")
        require(0.0 < self.temperature <= 10.0, "temperature must be in (0, 10]")
        require(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        require(1 <= self.batch_size <= 1024, "batch_size must be 1..1024")
        require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")
        require(self.device == "cpu" or self.device.startswith("cuda"), "device must be cpu, cuda or cuda:N")
        require(self.device != "cpu" or self.dtype != "float16", "float16 needs a GPU (device cuda)")
        return self

    def settings(self, modality: str) -> dict[str, Any]:
        """The settings that shape an output of ``modality``: recorded in each sample's metadata,
        and what "the same rendering" means when a version's earlier sample is reused."""
        if modality == "text":
            return {
                "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
            }
        out: dict[str, Any] = {
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "resolution": self.resolution,
        }
        if modality == "video":
            out.update(frames=self.frames, fps=self.fps)
        return out


@dataclass
class Rendered:
    """One output: PNG or MP4 bytes (``data``) or ``text``, with what made it."""

    prompt: str
    seed: int
    data: bytes = b""
    text: str = ""
    extension: str = ""


class Generator:
    """A loaded generator: ``render(prompts, seeds)`` gives one output per (prompt, seed)."""

    def __init__(
        self, model: Any, tokenizer: Any, info: ModelDir, modality: str, config: RenderConfig
    ) -> None:
        self.model, self.tokenizer, self.info, self.modality, self.config = (
            model,
            tokenizer,
            info,
            modality,
            config,
        )

    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Rendered]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
        out: list[Rendered] = []
        b = self.config.batch_size
        for start in range(0, len(prompts), b):
            ps, ss = list(prompts[start : start + b]), list(seeds[start : start + b])
            if self.modality == "text":
                out.extend(self._texts(ps, ss))
            else:
                out.extend(self._media(ps, ss))
        return out

    def _generators(self, seeds: Sequence[int]) -> list[Any]:
        import torch

        device = "cpu" if self.config.device == "cpu" else self.config.device
        return [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def _media(self, prompts: list[str], seeds: list[int]) -> list[Rendered]:
        c = self.config
        kwargs: dict[str, Any] = {
            "num_inference_steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "generator": self._generators(seeds),
            "output_type": "np",
        }
        if c.resolution:
            kwargs.update(height=c.resolution, width=c.resolution)
        if self.modality == "video":
            frames = self.model(prompt=prompts, num_frames=c.frames, **kwargs).frames
            clips = [_uint8(np.asarray(f)) for f in frames]
            return [
                Rendered(p, s, data=encode_mp4(v, fps=c.fps), extension="mp4")
                for p, s, v in zip(prompts, seeds, clips, strict=True)
            ]
        images = np.asarray(self.model(prompt=prompts, **kwargs).images)
        return [
            Rendered(p, s, data=encode_png(_uint8(im)), extension="png")
            for p, s, im in zip(prompts, seeds, images, strict=True)
        ]

    def _texts(self, prompts: list[str], seeds: list[int]) -> list[Rendered]:
        import torch

        c = self.config
        out = []
        device = self.model.device
        for prompt, seed in zip(prompts, seeds, strict=True):
            # One at a time: a seed then decides the whole completion, whatever else is rendered.
            torch.manual_seed(int(seed))
            ids = self.tokenizer(prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                gen = self.model.generate(
                    **ids,
                    do_sample=True,
                    max_new_tokens=c.max_new_tokens,
                    temperature=c.temperature,
                    top_p=c.top_p,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            text = self.tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append(Rendered(prompt, seed, text=storable_text(text)))
        return out


def storable_text(text: str) -> str:
    """A model's text as a sample can hold it: a byte-level tokenizer can decode to any character,
    NUL included, which PostgreSQL's text cannot store (and a sample refuses); each becomes U+FFFD,
    the replacement character, so the output is kept and shows where something was dropped."""
    return text.replace("\x00", "\ufffd")


def _uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, *, fps: int) -> bytes:
    """(F, H, W, 3) uint8 frames as an H.264 MP4 (sides cropped to even, as yuv420p needs)."""
    # Same as simulate/generators.py:_encode_mp4 (simulate is not a dependency of training).
    import av

    f, h, w = frames.shape[:3]
    h2, w2 = h - h % 2, w - w % 2
    with tempfile.TemporaryDirectory(prefix="rl-render-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "threads": "1"}
            for i in range(f):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i, :h2, :w2]), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(path, "rb") as fh:
            return fh.read()


def resolve(model_dir: str, base: str = "") -> tuple[ModelDir, ModelDir | None]:
    """The model directory and, for an adapter, its base (``base``, else the one the adapter
    names), both inspected; ``ModelDirError`` when either is unusable."""
    info = inspect_model_dir(model_dir)
    if info.kind != "lora":
        return info, None
    base = base or info.base
    if not base:
        raise ModelDirError(f"{model_dir}: a LoRA adapter without a base model to run on")
    base_info = inspect_model_dir(base)
    if base_info.kind == "lora":
        raise ModelDirError(f"{base}: the base of an adapter must be a model, not another adapter")
    if info.details.get("format") == "peft" and base_info.kind != "causal_lm":
        raise ModelDirError(
            f"{model_dir}: a peft adapter runs on a causal language model, not {base_info.describe()}"
        )
    if info.details.get("format") == "diffusers" and base_info.kind == "causal_lm":
        raise ModelDirError(f"{model_dir}: a diffusers LoRA runs on a pipeline, not {base_info.describe()}")
    return info, base_info


def load_generator(model_dir: str, *, base: str = "", config: RenderConfig) -> Generator:
    """Load a generator from local files only (see the module docstring)."""
    import torch

    info, base_info = resolve(model_dir, base)
    model_info = base_info or info
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    if model_info.kind == "causal_lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(
            str(model_info.path), local_files_only=True, dtype=dtype
        )
        tok_dir = info.path if (info.path / "tokenizer_config.json").is_file() else model_info.path
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        if base_info is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(info.path), local_files_only=True)
        model.to(config.device).eval()
        return Generator(model, tokenizer, info, "text", config)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_info.path), local_files_only=True, dtype=dtype)
    if base_info is not None:
        pipe.load_lora_weights(str(info.path))
    pipe.to(config.device)
    pipe.set_progress_bar_config(disable=True)
    return Generator(pipe, None, info, model_info.modality, config)


def check_config(config: Any) -> RenderConfig:
    """A render config from JSON-like data, or ``ConfigError``."""
    if isinstance(config, RenderConfig):
        return config.validate()
    return RenderConfig.from_dict(config)


__all__ = [
    "ConfigError",
    "Generator",
    "RenderConfig",
    "Rendered",
    "check_config",
    "encode_mp4",
    "encode_png",
    "load_generator",
    "resolve",
]
