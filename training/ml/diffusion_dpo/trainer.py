"""Diffusion-DPO, read top to bottom (Wallace et al. 2023, eq. 14).

Each step takes ``batch_size`` judged pairs (prompt, winner, loser):
1. Both images are encoded to latents by the pipeline's VAE.
2. One noise and one timestep per pair, shared by its winner and loser; both are noised.
3. The policy (UNet + LoRA) and the reference (the same UNet, adapter disabled) predict the noise
   (or the velocity, for v-prediction models); each error is a per-element mean squared error.
4. loss = -log sigmoid(-beta / 2 * ((err_w - ref_w) - (err_l - ref_l))): the policy is pushed to
   denoise winners better than the reference does, and losers worse.
At the first step the adapter is a no-op, so the policy equals the reference and the loss is
exactly log 2. ``implicit_accuracy`` is the share of pairs whose inner term is positive.

Written here because diffusers ships Diffusion-DPO only as an example script and TRL has none.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.ml.diffusion.lora import add_unet_lora, save_checkpoint
from training.ml.diffusion.sampling import encode_prompts, load_ddim_pipeline
from training.ml.diffusion_dpo.config import DiffusionDPOConfig

Pair = tuple[str, Image.Image, Image.Image]  # prompt, winner, loser


@dataclass
class DPOStepMetrics:
    step: int
    loss: float
    implicit_accuracy: float
    winner_gain: float  # ref_w - err_w: how much better the policy denoises winners than the reference
    loser_gain: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass
class DPOResult:
    metrics: list[DPOStepMetrics] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def _pixels(images: Sequence[Image.Image], side: int, device: str) -> torch.Tensor:
    """(B, 3, side, side) in [-1, 1], as the VAE takes them."""
    arr = np.stack(
        [
            np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
            for im in images
        ]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device) / 127.5 - 1.0


def _errors(
    unet: Any, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction."""
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond).sample.float()
    return ((pred - target) ** 2).mean(dim=(1, 2, 3))


def train(
    config: DiffusionDPOConfig,
    pairs: Sequence[Pair],
    *,
    output_dir: str | Path,
    progress: Callable[[DPOStepMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DPOResult:
    """Diffusion-DPO over ``pairs``; checkpoints go to ``output_dir/checkpoint-<step>``."""
    config.validate()
    if not pairs:
        raise ValueError("no judged pairs to train on")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pipe = load_ddim_pipeline(config.pipeline, device=config.device, dtype=config.dtype)
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    params = add_unet_lora(unet, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    unet.eval()
    side = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    alphas = scheduler.alphas_cumprod.to(config.device).float()
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    out = Path(output_dir)
    result = DPOResult()
    for step in range(1, config.steps + 1):
        if should_stop is not None and should_stop():
            break
        t0 = time.perf_counter()
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(config.batch_size)]
        prompts = [p for p, _, _ in batch]
        with torch.no_grad():
            pixels = _pixels([w for _, w, _ in batch] + [lo for _, _, lo in batch], side, config.device)
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator).float()
            latents = latents * vae.config.scaling_factor
            embeds, _ = encode_prompts(pipe, prompts, guidance=False)
        b = len(batch)
        noise = torch.randn(latents[:b].shape, generator=generator, device=config.device).repeat(2, 1, 1, 1)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=config.device
        )
        t = t.repeat(2)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else a.sqrt() * noise - (1 - a).sqrt() * latents
        )
        cond = embeds.repeat(2, 1, 1).to(unet.dtype)

        err = _errors(unet, noisy, t, cond, target)
        with torch.no_grad():
            unet.disable_adapters()
            try:
                ref = _errors(unet, noisy, t, cond, target)
            finally:
                unet.enable_adapters()
        err_w, err_l, ref_w, ref_l = err[:b], err[b:], ref[:b], ref[b:]
        inside = -0.5 * config.beta * ((err_w - ref_w) - (err_l - ref_l))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = DPOStepMetrics(
            step=step,
            loss=float(loss.detach()),
            implicit_accuracy=float((inside.detach() > 0).float().mean()),
            winner_gain=float((ref_w - err_w.detach()).mean()),
            loser_gain=float((ref_l - err_l.detach()).mean()),
            seconds=time.perf_counter() - t0,
        )
        if not math.isfinite(metrics.loss):
            raise ValueError(f"step {step}: the loss is not finite; lower learning_rate or beta")
        result.metrics.append(metrics)
        if progress is not None:
            progress(metrics)
        if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
            path = save_checkpoint(
                type(pipe), unet, out / f"checkpoint-{step}", config=config.to_dict(),
                files={"metrics.json": json.dumps([m.to_dict() for m in result.metrics])},
            )  # fmt: skip
            result.checkpoints.append(path)
    return result
