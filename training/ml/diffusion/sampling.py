"""Sampling from a Stable Diffusion-like pipeline with each DDIM step's log-probability recorded.

The pipeline's own components do the work (its ``encode_prompt``, UNet, scheduler configuration
and VAE), so a pipeline that ``pipeline(...)`` can run is one this can sample from; only the step
is ours (``ddim.ddim_step_with_logprob``), because diffusers' does not return the density. The
same function, ``unet_step``, computes a step's log-probability while sampling and again while
training, so the two agree exactly when the batch, the precision and the weights are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from training.ml.diffusion.ddim import check_scheduler, ddim_step_with_logprob

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Rollout:
    """B sampled images with their trajectories: ``latents`` (B, T+1, C, h, w) from the initial noise
    to the final latent, ``log_probs`` (B, T) of each step as sampled, ``timesteps`` (T,), the text
    conditioning ``embeds`` (B, L, D) and ``negative_embeds`` (B, L, D) (None without guidance), and
    ``images`` (B, 3, H, W) in [0, 1]."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    images: torch.Tensor

    def select(self, idx: torch.Tensor | slice) -> Rollout:
        neg = None if self.negative_embeds is None else self.negative_embeds[idx]
        return Rollout(
            self.latents[idx], self.log_probs[idx], self.timesteps, self.embeds[idx], neg, self.images[idx]
        )

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        neg = None if parts[0].negative_embeds is None else torch.cat([p.negative_embeds for p in parts])  # type: ignore[misc]
        return Rollout(
            torch.cat([p.latents for p in parts]),
            torch.cat([p.log_probs for p in parts]),
            parts[0].timesteps,
            torch.cat([p.embeds for p in parts]),
            neg,
            torch.cat([p.images for p in parts]),
        )


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] as PIL images."""
    arr = (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )
    return [Image.fromarray(a) for a in arr]


def encode_prompts(
    pipe: Any, prompts: list[str], *, guidance: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own prompt encoding: (embeds, negative embeds or None)."""
    embeds, negative = pipe.encode_prompt(
        prompts, pipe.unet.device, 1, guidance, negative_prompt=[""] * len(prompts) if guidance else None
    )
    return embeds, (negative if guidance else None)


def unet_step(
    pipe: Any,
    latents: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    *,
    guidance_scale: float,
    eta: float,
    prev_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_mean: bool = False,
) -> Any:
    """One guided UNet evaluation and DDIM step at timestep ``t`` (a scalar tensor): (next latents,
    log-probability (B,)), plus the step's mean and std with ``return_mean``. With
    ``prev_latents``, scores that step instead of drawing one."""
    unet = pipe.unet
    dtype = unet.dtype
    if negative_embeds is not None:
        model_in = torch.cat([latents, latents])
        cond = torch.cat([negative_embeds, embeds])
    else:
        model_in, cond = latents, embeds
    model_in = pipe.scheduler.scale_model_input(model_in, t)
    out = unet(model_in.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    if negative_embeds is not None:
        uncond, text = out.chunk(2)
        out = uncond.float() + guidance_scale * (text.float() - uncond.float())
    return ddim_step_with_logprob(
        pipe.scheduler,
        out,
        t,
        latents,
        eta=eta,
        prev_sample=prev_latents,
        generator=generator,
        return_mean=return_mean,
    )


@torch.no_grad()
def sample_with_logprob(
    pipe: Any,
    prompts: list[str],
    *,
    steps: int,
    guidance_scale: float,
    eta: float,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one image per prompt with ``steps`` DDIM steps, recording every step."""
    guidance = guidance_scale > 1.0
    embeds, negative = encode_prompts(pipe, prompts, guidance=guidance)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (len(prompts), pipe.unet.config.in_channels, height // scale, width // scale)
    latents = torch.randn(shape, generator=generator, device=pipe.unet.device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    trajectory, log_probs = [latents], []
    for t in scheduler.timesteps:
        latents, log_prob = unet_step(
            pipe, latents, t, embeds, negative, guidance_scale=guidance_scale, eta=eta, generator=generator
        )
        trajectory.append(latents)
        log_probs.append(log_prob)
    vae = pipe.vae
    decoded = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return Rollout(
        latents=torch.stack(trajectory, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=scheduler.timesteps.clone(),
        embeds=embeds,
        negative_embeds=negative,
        images=images,
    )


def load_ddim_pipeline(pipeline: str, *, device: str, dtype: str) -> Any:
    """A Stable Diffusion-like pipeline from its local directory (``from_pretrained``, local files
    only), its scheduler replaced by DDIM with the same configuration, frozen weights in ``dtype``."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    path = Path(pipeline)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, dtype=DTYPE[dtype])
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise ValueError(
            f"{path}: a {type(pipe).__name__} has no UNet; DDPO and diffusion GRPO sample Stable "
            "Diffusion-like pipelines with DDIM (flow-matching pipelines such as SD3 or Wan: not yet)"
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    check_scheduler(pipe.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def check_rewards(values: Any, n: int) -> np.ndarray:
    """The reward function's output as (n,) float64, or a readable error (it is untrusted)."""
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the reward function returned something that is not numbers: {exc}") from exc
    if arr.shape != (n,):
        raise ValueError(f"the reward function returned {arr.size} values for {n} images")
    if not np.isfinite(arr).all():
        raise ValueError("the reward function returned NaN or infinity")
    return arr
