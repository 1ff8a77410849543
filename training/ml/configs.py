"""Reading an algorithm's config dataclass from JSON-like data (an API body, a job row), the same
way for every algorithm: unknown keys and values of the wrong type are refused by name before the
dataclass's own ``validate`` checks the ranges."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range, named."""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _typed(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name}: expected {type(default).__name__}, got {type(value).__name__}")
    return value


def config_from_dict(cls: type[T], data: Any) -> T:
    """``cls(**data).validate()``, after refusing unknown keys and wrongly typed values."""
    if not isinstance(data, dict):
        raise ConfigError("config must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values = {k: _typed(k, v, _default(fields[k])) for k, v in data.items()}
    config = cls(**values)
    return config.validate()  # type: ignore[attr-defined]


DTYPES = ("float32", "bfloat16", "float16")


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def check_diffusion_common(config: Any) -> None:
    """The checks every diffusion trainer's config shares: image side, LoRA, checkpoints, device
    and precision (fields ``resolution``, ``lora_rank``, ``lora_alpha``, ``lora_targets``,
    ``checkpoint_every``, ``dtype``, ``device``)."""
    r = config.resolution
    require(
        r == 0 or (8 <= r <= 2048 and r % 8 == 0),
        "resolution must be 0 (the model's) or a multiple of 8 in 8..2048",
    )
    require(1 <= config.lora_rank <= 256, "lora_rank must be 1..256")
    require(1 <= config.lora_alpha <= 1024, "lora_alpha must be 1..1024")
    require(bool(config.lora_targets), "lora_targets must name at least one module")
    require(config.checkpoint_every >= 0, "checkpoint_every must be >= 0")
    require(config.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}")
    d = config.device
    require(d == "cpu" or d == "cuda" or d.startswith("cuda:"), "device must be cpu, cuda or cuda:N")
    require(
        not (d == "cpu" and config.dtype == "float16"), "float16 needs a GPU: use float32 or bfloat16 on cpu"
    )
