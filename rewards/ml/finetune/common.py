"""What the image and text fine-tuning trainers share: peft LoRA, the inner validation split, early
stopping, the temperature, and writing the adapter directory.

LoRA is peft's (``LoraConfig`` + ``get_peft_model``), so a saved adapter loads with plain
``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter_dir)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

from rewards.ml.heads import (
    cosine_lr,
    decisive_logit,
    head_temperatures,
    initial_tie_param,
    inner_split,
    pair_nll,
    scorer_inputs,
    standardiser_sample,
)
from rewards.ml.model import RewardModel
from rewards.ml.progress import ConfigError, Progress, ProgressLog, is_eval_epoch, run_epochs

ENCODER_DIR = "encoder"  # the merged fine-tuned encoder's sub-directory of a saved model
ADAPTER_DIR = "adapter"  # the peft adapter's sub-directory (LoRA runs only)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- LoRA (peft) -----------------------------------------------------------------------------------


def add_lora(
    model: nn.Module,
    *,
    layer_prefix: str,
    n_layers: int,
    layers: int | None,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float,
    layer_kind: str = "layers",
) -> PeftModel:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters on the ``targets`` linears of the last
    ``layers`` (None = all ``n_layers``) transformer layers under ``layer_prefix`` (e.g.
    ``vision_model.encoder.layers`` or ``encoder.layer``). peft freezes everything else. B starts at zero,
    so before the first optimiser step the model computes exactly what it did.

    ``ConfigError`` for more ``layers`` than the encoder has (``layer_kind`` names them in the message, e.g.
    "vision layers") and for a target that is no linear of the chosen layers (an encoder whose layers name
    their linears differently would otherwise silently get fewer adapters than asked for)."""
    if layers is not None and layers > n_layers:
        raise ConfigError("lora_layers", f"the encoder has {n_layers} {layer_kind}, got {layers}")
    first = 0 if layers is None else n_layers - layers
    indices = "|".join(str(i) for i in range(first, n_layers))
    names = "|".join(re.escape(t) for t in targets)
    # peft full-matches a string against each module name: exactly these layers, exactly these linears
    # (a CLIP's text tower has q_proj too, under text_model.*, which this leaves alone).
    pattern = rf"{re.escape(layer_prefix)}\.({indices})\.(.*\.)?({names})"
    config = LoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but only ever divides by it (scaling = alpha / r): a float such
        # as 12.5 works and is saved as such in adapter_config.json.
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=pattern,
        bias="none",
    )
    missing = [
        t
        for t in targets
        if not any(_is_target(name, layer_prefix, first, t) for name, _ in model.named_modules())
    ]
    if missing:
        raise ConfigError(
            "lora_targets",
            f"{', '.join(missing)}: no such linear in the encoder's {layer_kind} ({type(model).__name__})",
        )
    return get_peft_model(model, config)


def _is_target(name: str, layer_prefix: str, first: int, target: str) -> bool:
    """Whether module ``name`` is a ``target`` linear of layer ``first`` (the first adapted one)."""
    return name.startswith(f"{layer_prefix}.{first}.") and name.rsplit(".", 1)[-1] == target


def trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names (without peft's ``base_model.model.`` prefix) and parameters that require grad."""
    names, params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name.removeprefix("base_model.model."))
            params.append(param)
    return names, params


class Adapter:
    """A LoRA run's adapter, kept so it can still be written after the encoder was merged: peft's config
    (``base_model_name_or_path`` = the directory the base encoder was loaded from) and the adapter weights
    with peft's own key names."""

    def __init__(self, model: PeftModel) -> None:
        self.config = model.peft_config["default"]
        self.state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    def save(self, directory: Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, as ``PeftModel.save_pretrained``
        does."""
        directory.mkdir(parents=True, exist_ok=True)
        self.config.inference_mode = True
        self.config.save_pretrained(str(directory))
        state = {k: v.contiguous() for k, v in self.state.items()}
        safetensors.torch.save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def merged(model: nn.Module) -> tuple[nn.Module, Adapter | None]:
    """``model`` with any LoRA adapters folded into its weights (a plain transformers model again, same
    state dict keys as the base) and the adapter that was merged (None when ``model`` is not a peft model)."""
    if not isinstance(model, PeftModel):
        return model, None
    adapter = Adapter(model)
    return model.merge_and_unload(), adapter


# --- Inner validation split, early stopping, temperature -------------------------------------------


class EarlyStopping:
    """Tracks the inner-split loss: ``update`` says whether it is the best so far; ``stop`` turns True after
    ``patience`` evaluations in a row without improvement."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_step = 0
        self.bad = 0

    def update(self, loss: float, step: int) -> bool:
        if loss < self.best - 1e-6:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience


def snapshot(params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Copies of named tensors (the trained encoder parameters and the head's state), to restore the best."""
    return {name: t.detach().clone() for name, t in params}


@torch.no_grad()
def restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``snapshot(module.named_parameters())`` or a state dict) back into ``module``."""
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, value in state.items():
        own[name].copy_(value)


def pair_figures(
    d: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, tie_param: torch.Tensor, ties: str
) -> tuple[float, float | None]:
    """Weighted negative log-likelihood (the training loss, ties included) and decisive-pair accuracy of
    reward differences ``d`` (P, 1)."""
    with torch.no_grad():
        loss = float(pair_nll(d, target, weight, tie_param, ties))
        decisive = target != 0
        if not bool(decisive.any()):
            return loss, None
        logit = decisive_logit(d, tie_param, ties)[decisive]
        right = torch.where(logit == 0, 0.5, ((logit > 0) == (target[decisive] > 0)).double())
        w = weight[decisive].double()
        return loss, float((w * right).sum() / w.sum())


def check_pair_arrays(pairs: Any, samples: int, what: str) -> None:
    """Turn the ``a``, ``b``, ``outcome``, ``weight`` (and ``groups``) of ``TextPairs`` / ``ImagePairs``
    into arrays of their dtypes, in place, and check they are ``(P,)`` and index the ``samples`` items."""
    pairs.a = np.asarray(pairs.a, dtype=np.int64)
    pairs.b = np.asarray(pairs.b, dtype=np.int64)
    pairs.outcome = np.asarray(pairs.outcome, dtype=np.int8)
    pairs.weight = np.asarray(pairs.weight, dtype=np.float32)
    if pairs.a.ndim != 1:
        raise ValueError(f"a must have shape (P,), got {pairs.a.shape}")
    p = pairs.a.shape[0]
    for name in ("b", "outcome", "weight"):
        if getattr(pairs, name).shape != (p,):
            raise ValueError(f"{name} must have shape ({p},)")
    if pairs.groups is not None:
        pairs.groups = np.asarray(pairs.groups, dtype=np.int64)
        if pairs.groups.shape != (p,):
            raise ValueError(f"groups must have shape ({p},)")
    if p and (min(pairs.a.min(), pairs.b.min()) < 0 or max(pairs.a.max(), pairs.b.max()) >= samples):
        raise ValueError(f"pair indices out of range of the {samples} {what}")


def fit_temperature(
    d: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, tie_param: torch.Tensor, ties: str
) -> float:
    """The temperature of ``d = r_a - r_b`` on the inner split, fitted as the frozen-feature heads fit
    theirs (``heads.head_temperatures``: decisive pairs, the tie parameter fixed), so that every kind's
    reported probabilities mean the same thing."""
    return float(
        head_temperatures(
            d.detach().reshape(-1, 1),
            target.reshape(-1, 1),
            weight.reshape(-1, 1),
            tie_param,
            ties,
            shared=False,
        )[0]
    )


@torch.no_grad()
def fold_temperature(head: RewardModel, temperature: float) -> None:
    """Divide a linear head's output by ``temperature`` for good: its output layer's weight and bias are
    scaled, so every reader of the saved head (ours, or plain safetensors) gets the calibrated reward."""
    head.scorer.out_weight.div_(temperature)
    head.scorer.out_bias.div_(temperature)


def base_info(info: Any) -> dict[str, Any]:
    """What a saved model records about the encoder fine-tuning started from (an ``EncoderInfo``)."""
    return {
        "path": info.path,
        "name": info.name,
        "fingerprint": info.fingerprint,
        "family": info.family,
        "model_type": info.model_type,
    }


# --- The loop both trainers run --------------------------------------------------------------------

STANDARDISER_SAMPLES = 1024  # samples embedded (no grad) before training to set the head's input scaling


@dataclass
class LoopResult:
    """What ``fit`` learnt besides the weights (which it leaves in the models)."""

    curves: list[dict[str, Any]]
    temperature: float  # 1.0 without an inner split or with ``calibrate=False``
    train_pairs: int  # pairs trained on (after the inner split)
    val_pairs: int  # pairs of the inner split (0: none)
    best_step: int  # the step whose weights were kept (the last one without an inner split)
    steps: int  # steps actually run (fewer than planned when stopped early)
    stopped_early: bool
    val_loss: float | None  # inner-split loss of the kept weights, before the temperature
    val_accuracy: float | None


def fit(
    *,
    config: Any,
    model: nn.Module,
    trained: list[nn.Parameter],
    head: RewardModel,
    embed_train: Callable[[np.ndarray], torch.Tensor],
    embed_eval: Callable[[np.ndarray], torch.Tensor],
    prompts: torch.Tensor | None,
    a: np.ndarray,
    b: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    groups: np.ndarray | None,
    rng: np.random.Generator,
    device: torch.device,
    holdout_metrics: Callable[[], dict[str, Any]] | None,
    progress: Callable[[Progress], None] | None,
) -> LoopResult:
    """Train ``trained`` (encoder parameters) and ``head`` end to end on the pairs ``(a, b)`` (sample indices)
    with targets 1 / 0 (tie) / -1 and weights, all kept (nothing dropped) already.

    ``embed_train(indices)`` returns the ``(N, D)`` normalised embeddings of those samples with gradients
    (train mode, the config's autocast); ``embed_eval(indices)`` the same without gradients in eval mode,
    float32. ``prompts`` (``(S, D)``, per sample) feeds a prompt-conditioned head. Holds out the inner split
    (``inner_split``), stops early on its loss, restores the best weights, then fits and folds the
    temperature. ``holdout_metrics()`` is reported at each evaluation epoch (``is_eval_epoch``).
    """
    # The heads' rule (``rewards.ml.heads.inner_split``), so every kind splits its pairs alike.
    train_idx, val_idx = inner_split(
        len(a), groups, fraction=config.val_fraction, min_pairs=config.min_val_pairs, seed=config.seed
    )
    target_t = torch.as_tensor(target, device=device)[:, None]
    weight_t = torch.as_tensor(weight, device=device, dtype=torch.float32)[:, None]
    assert head.tie_param is not None
    tie_param = head.tie_param

    def differences(pair_index: np.ndarray) -> torch.Tensor:
        """Eval-mode reward differences ``(P, 1)`` of the pairs at ``pair_index``."""
        used, inverse = np.unique(np.concatenate([a[pair_index], b[pair_index]]), return_inverse=True)
        x = embed_eval(used)
        prompt = None if prompts is None else prompts[torch.as_tensor(used, device=device)]
        with torch.no_grad():
            mask = torch.ones((x.shape[0], 1), dtype=torch.bool, device=device)
            r = head(x[:, None, :], mask, prompt)[torch.as_tensor(inverse.reshape(-1), device=device)]
        r_a, r_b = r.split(len(pair_index))
        return r_a - r_b

    # Scale the head's inputs from the encoder's embeddings before any fine-tuning (see heads.Scorer).
    model.eval()
    sample = standardiser_sample(np.concatenate([a[train_idx], b[train_idx]]), rng, size=STANDARDISER_SAMPLES)
    x0 = embed_eval(sample)
    prompt0 = None if prompts is None else prompts[torch.as_tensor(sample, device=device)]
    head.scorer.fit_standardiser(scorer_inputs(x0, prompt0))
    with torch.no_grad():
        tie_param.copy_(torch.as_tensor(initial_tie_param(target[train_idx, None], weight[train_idx, None])))

    optimizer = torch.optim.AdamW(
        [
            {"params": trained, "weight_decay": config.weight_decay, "peak_lr": config.lr},
            *({**group, "peak_lr": config.head_lr} for group in head.optimizer_groups(config.weight_decay)),
        ],
        lr=config.lr,
    )
    clipped = trained + list(head.parameters())
    # float16 gradients underflow without loss scaling; bfloat16 has float32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")

    n = train_idx.size
    steps_per_epoch = math.ceil(n / config.batch_size)
    epochs = run_epochs(config, steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    log = ProgressLog(
        total_steps=total_steps, epochs=epochs, log_every_steps=config.log_every_steps, callback=progress
    )
    stopping = EarlyStopping(config.patience)
    named_trained = [(f"encoder.{i}", p) for i, p in enumerate(trained)]
    best: dict[str, dict[str, torch.Tensor]] | None = None
    val_figures: tuple[float, float | None] = (math.nan, None)

    def validate(step: int) -> dict[str, Any]:
        nonlocal best, val_figures
        if not val_idx.size:
            return {}
        model.eval()
        head.eval()
        loss, acc = pair_figures(
            differences(val_idx), target_t[val_idx], weight_t[val_idx], tie_param, config.ties
        )
        if stopping.update(loss, step):
            best = {"encoder": snapshot(named_trained), "head": snapshot(head.state_dict().items())}
            val_figures = (loss, acc)
        model.train()
        head.train()
        return {"val_loss": loss, "val_accuracy": acc}

    step = 0
    stopped = False
    for epoch in range(1, epochs + 1):
        model.train()
        head.train()
        order = train_idx[rng.permutation(n)]
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            # Embed each distinct sample of the batch once, then gather both sides of every pair.
            sides = np.concatenate([a[batch], b[batch]])
            used, inverse = np.unique(sides, return_inverse=True)
            x = embed_train(used)[torch.as_tensor(inverse.reshape(-1), device=device)]
            prompt = None if prompts is None else prompts[torch.as_tensor(sides, device=device)]
            mask = torch.ones((x.shape[0], 1), dtype=torch.bool, device=device)
            r_a, r_b = head(x[:, None, :], mask, prompt).split(len(batch))
            batch_t = torch.as_tensor(batch, device=device)
            loss = pair_nll(r_a - r_b, target_t[batch_t], weight_t[batch_t], tie_param, config.ties)

            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, group["peak_lr"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(clipped, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            log.step_done(step, epoch, loss.item())
            if config.eval_every_steps and step % config.eval_every_steps == 0 and start + len(batch) < n:
                figures = validate(step)
                if stopping.stop:
                    # The run ends here: report the holdout as an epoch end would.
                    stopped = True
                    model.eval()
                    head.eval()
                    figures.update(holdout_metrics() if holdout_metrics is not None else {})
                if figures:
                    log.epoch_done(step, epoch, figures)
                if stopped:
                    break
        if not stopped:
            metrics = validate(step)
            stopped = stopping.stop
            model.eval()
            head.eval()
            if is_eval_epoch(epoch, epochs) or stopped:
                metrics.update(holdout_metrics() if holdout_metrics is not None else {})
            log.epoch_done(step, epoch, metrics)
        if stopped:
            break

    model.eval()
    head.eval()
    if best is not None:
        restore_named(named_trained, best["encoder"])
        restore(head, best["head"])
    temperature = 1.0
    if val_idx.size and config.calibrate:
        d = differences(val_idx)
        temperature = fit_temperature(d, target_t[val_idx], weight_t[val_idx], tie_param, config.ties)
        fold_temperature(head, temperature)
    return LoopResult(
        curves=log.curves,
        temperature=temperature,
        train_pairs=int(n),
        val_pairs=int(val_idx.size),
        best_step=stopping.best_step if best is not None else step,
        steps=step,
        stopped_early=stopped,
        val_loss=None if best is None else val_figures[0],
        val_accuracy=None if best is None else val_figures[1],
    )


@torch.no_grad()
def restore_named(params: list[tuple[str, nn.Parameter]], state: dict[str, torch.Tensor]) -> None:
    for name, param in params:
        param.copy_(state[name])
