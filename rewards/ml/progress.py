"""What every reward-model trainer shares that is not torch: progress reports, cancellation, config errors.

A trainer calls ``progress(Progress(...))`` every few steps (at least every ``PROGRESS_INTERVAL_S`` of work
and every ``log_every_steps`` steps) and once at the end of each epoch, with the holdout metrics when a
holdout set was given. The callback may raise ``TrainingCancelled``; the trainer lets it propagate unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Report at least this often (seconds of training work), so a UI can show a live curve.
PROGRESS_INTERVAL_S = 0.5

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DTYPES = ("float32", "float64")


@dataclass
class Progress:
    """One progress report of a running trainer."""

    step: int  # optimiser steps done so far (1-based: the first report after one step says 1)
    total_steps: int  # steps the run will take in all
    epoch: int  # the epoch being run, 1-based
    epochs: int  # epochs the run will take in all
    loss: float  # mean training loss over the steps since the previous report
    elapsed_s: float  # wall-clock seconds since training started
    eta_s: float  # estimated seconds left
    metrics: dict[str, Any] = field(
        default_factory=dict
    )  # holdout metrics at epoch end ("holdout_accuracy", ...)


class TrainingCancelled(Exception):
    """Raised by a progress callback to stop a run; trainers let it propagate unchanged."""


class ConfigError(ValueError):
    """A config field has a bad value (``field`` names it, so a form can show the message next to it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ProgressLog:
    """Collects the curve of a run and calls the progress callback on schedule.

    ``step_done`` after every optimiser step; ``epoch_done`` at the end of every epoch.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        epochs: int,
        log_every_steps: int,
        callback: Callable[[Progress], None] | None,
    ) -> None:
        self.total_steps = total_steps
        self.epochs = epochs
        self.log_every_steps = log_every_steps
        self.callback = callback
        self.curves: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self._last_report = self.start
        self._last_step = 0
        self._loss_sum = 0.0
        self._loss_count = 0
        self._last_loss = math.nan

    def step_done(self, step: int, epoch: int, loss: float) -> None:
        self._loss_sum += loss
        self._loss_count += 1
        now = time.perf_counter()
        if (
            step == 1
            or step - self._last_step >= self.log_every_steps
            or now - self._last_report >= PROGRESS_INTERVAL_S
        ):
            self._report(step, epoch, now, {})

    def epoch_done(self, step: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._report(step, epoch, time.perf_counter(), dict(metrics))

    def _report(self, step: int, epoch: int, now: float, metrics: dict[str, Any]) -> None:
        if self._loss_count:
            self._last_loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        elapsed = now - self.start
        eta = elapsed / step * (self.total_steps - step) if step else 0.0
        entry: dict[str, Any] = {"step": step, "epoch": epoch, "loss": self._last_loss}
        entry.update(metrics)
        self.curves.append(entry)
        self._last_report, self._last_step = now, step
        if self.callback is not None:
            self.callback(
                Progress(
                    step=step,
                    total_steps=self.total_steps,
                    epoch=epoch,
                    epochs=self.epochs,
                    loss=self._last_loss,
                    elapsed_s=elapsed,
                    eta_s=eta,
                    metrics=metrics,
                )
            )


# --- config helpers shared by the kinds' config.py ---------------------------------------------------

C = TypeVar("C")


def run_epochs(config: Any, steps_per_epoch: int) -> int:
    """``config.epochs``, raised so the run takes at least ``config.min_steps`` steps (capped at 1000)."""
    return min(1000, max(config.epochs, math.ceil(config.min_steps / steps_per_epoch)))


def is_eval_epoch(epoch: int, epochs: int) -> bool:
    """Whether to evaluate the holdout set (and report) at the end of ``epoch``: every epoch for runs of up
    to 20 epochs; for longer runs (small data sets that ``min_steps`` gives many epochs) about 20 evenly
    spaced epochs and the last, so evaluation does not dominate and the curve stays readable."""
    every = max(1, epochs // 20)
    return epoch % every == 0 or epoch == epochs


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys, then validate it."""
    if not isinstance(data, Mapping):
        raise ConfigError("config", "must be a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(", ".join(unknown), f"unknown config keys: {', '.join(unknown)}")
    config = cls(**data)
    config.validate()  # type: ignore[attr-defined]
    return config


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(name, f"must be {bound}, got {value}")


def check_float(name: str, value: Any, *, lo: float, lo_inclusive: bool, hi: float | None = None) -> None:
    """``value`` must be a finite number above ``lo`` (or equal when ``lo_inclusive``) and below ``hi``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if value < lo or (value == lo and not lo_inclusive):
        raise ConfigError(name, f"must be {'at least' if lo_inclusive else 'greater than'} {lo}, got {value}")
    if hi is not None and value >= hi:
        raise ConfigError(name, f"must be less than {hi}, got {value}")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}")


def check_device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE_RE.match(value):
        raise ConfigError(name, f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


def check_common(config: Any) -> None:
    """The fields every trainer config has (same meaning in every kind)."""
    check_int("epochs", config.epochs, 1, 1000)
    check_int("min_steps", config.min_steps, 0, 10_000_000)
    check_int("batch_size", config.batch_size, 1, 1_000_000)
    check_float("lr", config.lr, lo=0.0, lo_inclusive=False, hi=10.0)
    check_float("weight_decay", config.weight_decay, lo=0.0, lo_inclusive=True, hi=10.0)
    check_int("hidden", config.hidden, 0, 65536)
    check_int("hidden_layers", config.hidden_layers, 1, 8)
    check_float("dropout", config.dropout, lo=0.0, lo_inclusive=True, hi=1.0)
    check_choice("pooling", config.pooling, ("mean", "attention"))
    check_bool("use_prompt", config.use_prompt)
    check_int("seed", config.seed, 0, 2**63 - 1)
    check_device("device", config.device)
    check_choice("dtype", config.dtype, DTYPES)
    if config.num_threads is not None:
        check_int("num_threads", config.num_threads, 1, 1024)
    check_int("log_every_steps", config.log_every_steps, 1, 1_000_000)


def check_pairwise(config: Any) -> None:
    """The tie fields of the pairwise kinds (bt, aspects, ensemble)."""
    check_choice("ties", config.ties, ("davidson", "rao_kupper", "none"))
    check_choice("both_bad", config.both_bad, ("drop", "tie"))
    if config.both_bad == "tie" and config.ties == "none":
        raise ConfigError("both_bad", "'tie' needs a tie model (ties='davidson' or 'rao_kupper')")


TEXT_INPUTS = ("joint", "response")


def check_regularisation(config: Any) -> None:
    """The fields of the frozen-feature pairwise kinds that adapt training to the data size, and the text
    input form (bt, aspects, ensemble)."""
    if config.l2 is not None:
        check_float("l2", config.l2, lo=0.0, lo_inclusive=True, hi=100.0)
    check_float("val_fraction", config.val_fraction, lo=0.0, lo_inclusive=True, hi=0.5)
    check_int("min_val_pairs", config.min_val_pairs, 1, 1_000_000)
    check_int("patience", config.patience, 0, 1000)
    check_bool("calibrate", config.calibrate)
    check_choice("text_input", config.text_input, TEXT_INPUTS)
