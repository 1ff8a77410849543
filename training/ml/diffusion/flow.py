"""Sampling from a flow-matching pipeline (SD3-like text-to-image, Wan-like text-to-video) with each
step's log-probability, through the SDE form of the Euler step (the Flow-GRPO idea).

The deterministic Euler step of a flow-matching sampler, ``x' = x + (s' - s) v``, has no density.
With ``x_s = (1 - s) x0 + s eps`` and the predicted velocity ``v = eps - x0``, the score is
``-(x + (1 - s) v) / s``; the reverse-time SDE with the same marginals adds ``g^2 / 2`` times the
score to the drift and ``g dW`` of noise. Taking ``g = noise_level * sqrt(s / (1 - s))`` and one
Euler-Maruyama step of size ``ds = s' - s < 0``:

    mean = x + ds * (v + g^2 / (2 s) * (x + (1 - s) v))
    x'   = mean + g * sqrt(-ds) * z,       z ~ N(0, I)

a Gaussian step whose log-probability is exact. ``noise_level`` -> 0 gives back the Euler step. At
``s = 1`` the noise scale is infinite, so ``g`` is computed there with the schedule's second sigma.

As with DDIM (``sampling.py``), the pipeline's own components do the work: its ``encode_prompt``,
transformer, scheduler sigmas and VAE. The same ``flow_step`` scores a step while sampling and
again while training, so the two agree exactly when batch, precision and weights are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.ml.diffusion.sampling import DTYPE


def is_video(pipe: Any) -> bool:
    return hasattr(pipe, "vae_scale_factor_temporal")


@dataclass
class FlowCond:
    """The text conditioning of a batch: ``embeds`` (B, L, D), ``pooled`` (B, P) for SD3-like
    pipelines, and the negative (empty prompt) ones when guidance is on."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    negative: torch.Tensor | None
    negative_pooled: torch.Tensor | None

    def select(self, idx: torch.Tensor | slice) -> FlowCond:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return FlowCond(self.embeds[idx], pick(self.pooled), pick(self.negative), pick(self.negative_pooled))

    @staticmethod
    def cat(parts: list[FlowCond]) -> FlowCond:
        def join(name: str) -> torch.Tensor | None:
            first = getattr(parts[0], name)
            return None if first is None else torch.cat([getattr(p, name) for p in parts])

        return FlowCond(
            torch.cat([p.embeds for p in parts]), join("pooled"), join("negative"), join("negative_pooled")
        )


@dataclass
class FlowRollout:
    """B sampled outputs with their trajectories: ``latents`` (B, T+1, ...), ``log_probs`` (B, T),
    ``timesteps`` (T,) and ``sigmas`` (T+1,) of the schedule, the conditioning, and ``outputs``:
    images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    cond: FlowCond
    outputs: torch.Tensor

    def select(self, idx: torch.Tensor | slice) -> FlowRollout:
        return FlowRollout(
            self.latents[idx],
            self.log_probs[idx],
            self.timesteps,
            self.sigmas,
            self.cond.select(idx),
            self.outputs[idx],
        )

    @staticmethod
    def cat(parts: list[FlowRollout]) -> FlowRollout:
        return FlowRollout(
            torch.cat([p.latents for p in parts]),
            torch.cat([p.log_probs for p in parts]),
            parts[0].timesteps,
            parts[0].sigmas,
            FlowCond.cat([p.cond for p in parts]),
            torch.cat([p.outputs for p in parts]),
        )


def flow_sde_step(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    noise_level: float,
    sigma_cap: float,
    prev_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_mean: bool = False,
) -> Any:
    """One SDE Euler step from ``sigma`` to ``sigma_next`` (see the module docstring): (next latents,
    log-probability (B,) as the mean over elements), plus the step's mean and std with
    ``return_mean``. With ``prev_latents``, scores that step instead of drawing one."""
    if not sigma_next < sigma:
        raise ValueError(f"sigmas must decrease (got {sigma} -> {sigma_next})")
    v, x = velocity.float(), latents.float()
    ds = sigma_next - sigma
    s = min(sigma, sigma_cap)
    g = noise_level * math.sqrt(s / (1.0 - s))
    mean = x + ds * (v + (g * g / (2.0 * sigma)) * (x + (1.0 - sigma) * v))
    std = g * math.sqrt(-ds)
    if prev_latents is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_latents = mean + std * noise
    prev = prev_latents.float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if return_mean:
        return prev, log_prob, mean, torch.as_tensor(std, device=mean.device)
    return prev, log_prob


def encode_flow_prompts(pipe: Any, prompts: list[str], *, guidance: bool) -> FlowCond:
    """The pipeline's own prompt encoding (SD3-like: embeds and pooled; Wan-like: embeds)."""
    device = pipe.transformer.device
    negative = [""] * len(prompts) if guidance else None
    if is_video(pipe):
        embeds, neg = pipe.encode_prompt(
            prompts, negative_prompt=negative, do_classifier_free_guidance=guidance, device=device
        )
        return FlowCond(embeds, None, neg if guidance else None, None)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        negative_prompt=negative,
        do_classifier_free_guidance=guidance,
        device=device,
    )
    return FlowCond(embeds, pooled, neg if guidance else None, neg_pooled if guidance else None)


def velocity(
    pipe: Any, latents: torch.Tensor, t: torch.Tensor, cond: FlowCond, *, guidance_scale: float
) -> torch.Tensor:
    """The transformer's guided velocity at timestep ``t`` (float32)."""
    tr = pipe.transformer
    dtype = tr.dtype
    guided = cond.negative is not None
    x = torch.cat([latents, latents]) if guided else latents
    enc = torch.cat([cond.negative, cond.embeds]) if guided else cond.embeds  # type: ignore[list-item]
    kwargs: dict[str, Any] = {}
    if cond.pooled is not None:
        pooled = torch.cat([cond.negative_pooled, cond.pooled]) if guided else cond.pooled  # type: ignore[list-item]
        kwargs["pooled_projections"] = pooled.to(dtype)
    out = tr(
        hidden_states=x.to(dtype),
        timestep=t.expand(x.shape[0]),
        encoder_hidden_states=enc.to(dtype),
        return_dict=False,
        **kwargs,
    )[0].float()
    if guided:
        uncond, text = out.chunk(2)
        out = uncond + guidance_scale * (text - uncond)
    return out


def flow_step(
    pipe: Any,
    latents: torch.Tensor,
    i: int,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    cond: FlowCond,
    *,
    guidance_scale: float,
    noise_level: float,
    prev_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_mean: bool = False,
) -> Any:
    """Step ``i`` of the schedule: one guided transformer evaluation and one SDE step."""
    v = velocity(pipe, latents, timesteps[i], cond, guidance_scale=guidance_scale)
    return flow_sde_step(
        v,
        latents,
        float(sigmas[i]),
        float(sigmas[i + 1]),
        noise_level=noise_level,
        sigma_cap=float(sigmas[1]),
        prev_latents=prev_latents,
        generator=generator,
        return_mean=return_mean,
    )


def latent_shape(pipe: Any, batch: int, *, height: int, width: int, frames: int) -> tuple[int, ...]:
    c = pipe.transformer.config.in_channels
    if is_video(pipe):
        s, ts = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        if (frames - 1) % ts:
            raise ValueError(f"frames must be {ts} * k + 1 for this video VAE (got {frames})")
        return (batch, c, (frames - 1) // ts + 1, height // s, width // s)
    s = pipe.vae_scale_factor
    return (batch, c, height // s, width // s)


def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Final latents as images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]."""
    vae = pipe.vae
    if is_video(pipe):
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, z, 1, 1, 1)
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return (vae.decode(z.to(vae.dtype), return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_flow_with_logprob(
    pipe: Any,
    prompts: list[str],
    *,
    steps: int,
    guidance_scale: float,
    noise_level: float,
    height: int,
    width: int,
    frames: int = 1,
    generator: torch.Generator | None = None,
) -> FlowRollout:
    """Sample one output per prompt with ``steps`` SDE steps, recording every step."""
    cond = encode_flow_prompts(pipe, prompts, guidance=guidance_scale > 1.0)
    scheduler = pipe.scheduler
    device = pipe.transformer.device
    scheduler.set_timesteps(steps, device=device)
    timesteps, sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone().float()
    shape = latent_shape(pipe, len(prompts), height=height, width=width, frames=frames)
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    trajectory, log_probs = [latents], []
    for i in range(steps):
        latents, log_prob = flow_step(
            pipe, latents, i, timesteps, sigmas, cond,
            guidance_scale=guidance_scale, noise_level=noise_level, generator=generator,
        )  # fmt: skip
        trajectory.append(latents)
        log_probs.append(log_prob)
    return FlowRollout(
        latents=torch.stack(trajectory, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=timesteps,
        sigmas=sigmas,
        cond=cond,
        outputs=decode(pipe, latents),
    )


def load_flow_pipeline(pipeline: str, *, device: str, dtype: str) -> Any:
    """A flow-matching pipeline from its local directory (local files only) with an Euler
    flow-matching scheduler (a UniPC scheduler with flow sigmas, as Wan releases ship, is replaced
    by Euler with the same shift), frozen weights in ``dtype``."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    path = Path(pipeline)
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, dtype=DTYPE[dtype])
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(
            f"{path}: a {type(pipe).__name__} has no transformer; flow GRPO needs a flow-matching pipeline"
        )
    scheduler = pipe.scheduler
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        shift = scheduler.config.get("flow_shift")
        if not scheduler.config.get("use_flow_sigmas") or shift is None:
            raise ValueError(f"{path}: the scheduler ({type(scheduler).__name__}) is not a flow-matching one")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=float(shift))
    if pipe.scheduler.config.get("use_dynamic_shifting"):
        raise ValueError(
            f"{path}: schedulers with resolution-dependent shifting (Flux-like) are not supported yet"
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    return pipe
