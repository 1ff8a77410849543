"""LoRA on a diffusers UNet through peft, saved the way diffusers loads it back:
``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(checkpoint)`` in any script,
outside this app. Checkpoints are written to a temporary directory and renamed into place, so a
reader (or a worker killed mid-save) never sees half a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
TRAINER_STATE = "trainer_state.pt"  # optimizer, RNG and iteration, for resuming
RUN_CONFIG = "rewardloop_config.json"  # the resolved config of the run that wrote the checkpoint


def add_unet_lora(unet: Any, *, rank: int, alpha: int, targets: list[str]) -> list[torch.nn.Parameter]:
    """Freeze the UNet and give it a LoRA adapter (peft, via diffusers' ``add_adapter``); returns
    the adapter's parameters, the only ones trained."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no module of the denoiser matches lora_targets {targets}")
    for p in params:  # trained in float32 whatever the frozen weights' precision
        p.data = p.data.float()
    return params


def save_checkpoint(
    pipeline_cls: Any,
    unet: Any,
    directory: str | Path,
    *,
    config: dict[str, Any],
    state: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    component: str = "unet",
) -> Path:
    """Write the denoiser's LoRA weights (diffusers' format; ``component``: ``unet``, or
    ``transformer`` for SD3- and Wan-like pipelines), the run's config, ``state`` for resuming and
    any other text ``files`` to ``directory`` atomically: a sibling temporary directory, renamed at
    the end."""
    target = Path(directory)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # peft's own key names, as diffusers' current LoRA scripts save them: converted to diffusers'
    # old names, LoRA on convolutions keeps peft's names and plain load_lora_weights then loads
    # only those, silently dropping the attention layers' LoRA.
    layers = get_peft_model_state_dict(unet)
    pipeline_cls.save_lora_weights(
        save_directory=str(tmp), **{f"{component}_lora_layers": layers}, safe_serialization=True
    )
    (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if state is not None:
        torch.save(state, tmp / TRAINER_STATE)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def load_lora_into(unet: Any, directory: str | Path, *, component: str = "unet") -> None:
    """Load a checkpoint's LoRA weights into a denoiser (``component``) that already has the same
    adapter (resuming, or continuing a previous run's adapter); an adapter of another shape (rank,
    targets) is refused by name rather than half loaded."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    path = Path(directory) / LORA_WEIGHTS
    if not path.is_file():
        raise ValueError(f"{directory}: no {LORA_WEIGHTS} (not a LoRA checkpoint)")
    weights = load_file(str(path))
    weights = {k.removeprefix(f"{component}."): v for k, v in weights.items()}
    try:
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(weights))
    except RuntimeError as exc:  # same modules, another rank: a size mismatch
        raise ValueError(f"{directory}: LoRA weights that do not fit this adapter: {exc}") from exc
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{directory}: LoRA weights that do not fit this adapter: {unexpected[:3]}")
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k]
    if missing:
        raise ValueError(f"{directory}: LoRA weights missing for this adapter's modules: {missing[:3]}")


def trainer_state(optimizer: Any, rng: Any, generator: torch.Generator, iteration: int) -> dict[str, Any]:
    """What a checkpoint keeps to resume exactly: optimizer, Python and torch RNG, iteration."""
    return {
        "optimizer": optimizer.state_dict(),
        "python_rng": rng.getstate(),
        "generator": generator.get_state(),
        "iteration": iteration,
    }


def resume_into(
    directory: str | Path,
    unet: Any,
    optimizer: Any,
    rng: Any,
    generator: torch.Generator,
    *,
    component: str = "unet",
) -> int:
    """Load a checkpoint's LoRA weights and trainer state back; returns the iteration it ended."""
    load_lora_into(unet, directory, component=component)
    state = torch.load(Path(directory) / TRAINER_STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["python_rng"])
    generator.set_state(state["generator"])
    return int(state["iteration"])
