"""What a local model directory holds, checked from its files alone (no weights loaded, no torch):
a diffusers pipeline (``model_index.json``), a transformers causal LM (``config.json``), or a LoRA
adapter (diffusers' ``pytorch_lora_weights.safetensors`` or peft's ``adapter_config.json``).

Used when a generator version is registered and when a job is launched, so a directory that is
missing, truncated (a copy that stopped half way) or of the wrong kind is refused with a readable
reason before any worker spends time loading it. Safetensors files are checked against their own
header (the byte length it promises); ``.bin`` files must be whole zip archives (torch's format).

Kinds:
- ``unet``: a Stable Diffusion-like text-to-image pipeline: a UNet and a discrete noise scheduler
  that DDIM can stand in for (what DDPO and diffusion GRPO sample);
- ``flow``: a flow-matching image pipeline (a transformer and ``FlowMatchEulerDiscreteScheduler``,
  as SD3's);
- ``video``: a text-to-video pipeline (Wan's and the like);
- ``causal_lm``: a transformers causal language model with its tokenizer;
- ``lora``: an adapter; it runs on the base model named with it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Pipeline components that hold weights (tokenizers, schedulers and feature extractors do not).
WEIGHTED = ("unet", "transformer", "transformer_2", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
VIDEO_MARKERS = ("Video", "Wan", "Mochi", "LTX", "Hunyuan", "Cog")
FLOW_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "UniPCMultistepScheduler",
)
MODALITY = {"unet": "image", "flow": "image", "video": "video", "causal_lm": "text"}


class ModelDirError(ValueError):
    """The directory is not a usable model of the kind wanted; the message says why."""


@dataclass(frozen=True)
class ModelDir:
    path: Path
    kind: str  # unet, flow, video, causal_lm or lora
    class_name: str  # the pipeline's or architecture's class
    scheduler: str = ""  # a pipeline's scheduler class
    base: str = ""  # a LoRA adapter: the base model it names, if any
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        """image, video or text ("" for an adapter, which has its base's)."""
        return MODALITY.get(self.kind, "")

    def describe(self) -> str:
        names = {
            "unet": "a UNet text-to-image pipeline",
            "flow": "a flow-matching image pipeline",
            "video": "a text-to-video pipeline",
            "causal_lm": "a causal language model",
            "lora": "a LoRA adapter",
        }
        return f"{names[self.kind]} ({self.class_name})"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: not a JSON object")
    return data


def check_safetensors(path: Path) -> int:
    """The number of tensors in a safetensors file whose header and length agree; else
    ``ModelDirError`` (a truncated or corrupt file)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelDirError(f"{path}: truncated ({size} bytes, not even a header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ModelDirError(
                    f"{path}: truncated or corrupt (header of {n} bytes in a {size}-byte file)"
                )
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise ModelDirError(f"{path}: unreadable ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelDirError(f"{path}: corrupt safetensors header")
    end = 0
    tensors = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelDirError(f"{path}: corrupt safetensors header (tensor {name!r})")
        end = max(end, offsets[1])
        tensors += 1
    if size != 8 + n + end:
        raise ModelDirError(f"{path}: truncated ({size} bytes; its header promises {8 + n + end})")
    return tensors


def _check_bin(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:  # reads the central directory at the end of the file
            zf.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelDirError(f"{path}: truncated or not a torch checkpoint ({exc})") from exc


def check_weights(directory: Path, *, stem: str = "") -> list[Path]:
    """The weight files of a model directory (safetensors, sharded or not, or torch ``.bin``), each
    checked whole; ``ModelDirError`` when there are none or one is damaged."""
    files = sorted(directory.glob("*.safetensors"))
    index = sorted(directory.glob("*.safetensors.index.json"))
    for idx in index:
        shards = set((_json(idx).get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (directory / str(s)).is_file())
        if missing:
            raise ModelDirError(f"{idx}: shards missing: {', '.join(missing[:5])}")
    if not files:
        files = sorted(directory.glob("*.bin"))
        for f in files:
            _check_bin(f)
    else:
        for f in files:
            check_safetensors(f)
    if stem:
        files = [f for f in files if f.name.startswith(stem)]
    if not files:
        raise ModelDirError(f"{directory}: no weights (no .safetensors or .bin file)")
    return files


def _pipeline(path: Path) -> ModelDir:
    index = _json(path / MODEL_INDEX)
    class_name = str(index.get("_class_name") or "")
    if not class_name:
        raise ModelDirError(f"{path / MODEL_INDEX}: no _class_name")
    components: dict[str, str] = {}
    for name, spec in index.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2) or spec[1] is None:
            continue
        components[name] = str(spec[1])
        sub = path / name
        if not sub.is_dir():
            raise ModelDirError(f"{path}: component {name!r} ({spec[1]}) is missing (no {name}/ directory)")
        if name in WEIGHTED:
            if not (sub / CONFIG).is_file():
                raise ModelDirError(f"{sub}: no {CONFIG}")
            _json(sub / CONFIG)
            check_weights(sub)
    scheduler = components.get("scheduler", "")
    if scheduler and not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ModelDirError(f"{path}/scheduler: no scheduler_config.json")
    details = {"components": components}
    if any(m in class_name for m in VIDEO_MARKERS) or "Video" in components.get("vae", ""):
        kind = "video"
    elif "unet" in components and scheduler not in FLOW_SCHEDULERS:
        kind = "unet"
    elif "transformer" in components:
        kind = "flow"
    else:
        raise ModelDirError(
            f"{path}: a {class_name} is neither a UNet text-to-image, a flow-matching nor a video pipeline"
        )
    return ModelDir(path, kind, class_name, scheduler, details=details)


def _causal_lm(path: Path) -> ModelDir:
    config = _json(path / CONFIG)
    architectures = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        found = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
        raise ModelDirError(f"{path}: not a causal language model ({found})")
    check_weights(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ModelDirError(f"{path}: no tokenizer (tokenizer.json or tokenizer_config.json)")
    return ModelDir(path, "causal_lm", architectures[0], details={"model_type": config.get("model_type")})


def _lora(path: Path) -> ModelDir:
    if (path / DIFFUSERS_LORA).is_file():
        tensors = check_safetensors(path / DIFFUSERS_LORA)
        return ModelDir(path, "lora", "diffusers LoRA", details={"tensors": tensors, "format": "diffusers"})
    config = _json(path / PEFT_CONFIG)
    check_weights(path, stem="adapter_model")
    base = str(config.get("base_model_name_or_path") or "")
    return ModelDir(
        path, "lora", f"peft {config.get('peft_type', 'LoRA')}", base=base, details={"format": "peft"}
    )


def inspect_model_dir(path: str | Path) -> ModelDir:
    """What ``path`` holds (see the module docstring), or ``ModelDirError`` saying why it is not a
    usable model directory."""
    try:
        if "\x00" in str(path):
            raise ValueError("a NUL byte in the path")
        p = Path(path)
        found = p.is_dir()
    except (OSError, ValueError, TypeError) as exc:  # a NUL byte, a name too long: the client's input
        raise ModelDirError(f"not a usable path ({exc})") from exc
    if not str(path):
        raise ModelDirError("no directory given")
    if not found:
        raise ModelDirError(f"{p}: no such directory")
    if (p / MODEL_INDEX).is_file():
        return _pipeline(p)
    if (p / DIFFUSERS_LORA).is_file() or (p / PEFT_CONFIG).is_file():
        return _lora(p)
    if (p / CONFIG).is_file():
        return _causal_lm(p)
    raise ModelDirError(
        f"{p}: not a model directory (no {MODEL_INDEX}, {CONFIG}, {DIFFUSERS_LORA} or {PEFT_CONFIG})"
    )


KIND_NAMES = {
    "unet": "a UNet text-to-image pipeline (Stable Diffusion-like, DDIM-compatible scheduler)",
    "flow": "a flow-matching image pipeline",
    "video": "a text-to-video pipeline",
    "causal_lm": "a causal language model",
    "lora": "a LoRA adapter",
}


def describe_kinds(kinds: tuple[str, ...]) -> str:
    return " or ".join(KIND_NAMES[k] for k in kinds)


def require_kind(info: ModelDir, kinds: tuple[str, ...], *, what: str) -> None:
    """``ModelDirError`` unless ``info`` is one of ``kinds``, naming what ``what`` needs."""
    if info.kind not in kinds:
        raise ModelDirError(f"{what} needs {describe_kinds(kinds)}; {info.path} is {info.describe()}")
