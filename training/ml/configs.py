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
