"""A DDIM step as a Gaussian policy: x_{t-1} ~ N(mean(x_t, eps), std^2), with its log-probability.

diffusers' ``DDIMScheduler.step`` draws x_{t-1} but does not say how likely it was; policy-gradient
methods (DDPO, GRPO on diffusion) need exactly that, for the sample drawn while sampling and again
for the same sample under the updated network while training. This is the same step written out
(Song et al. 2021, eq. 12, the scheduler's own alphas and timestep spacing) so both can be computed,
with all arithmetic in float32 whatever the network's precision.

The log-probability is the Gaussian density of x_{t-1} averaged over the latent's elements (not
summed), as DDPO does: ratios of per-element means stay near 1 and a clip range of 1e-4 means the
same at every resolution.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against ``like`` (B, ...)."""
    out = values.to(like.device)[t.to(values.device).long()].to(like.device)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def check_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler this step does not reproduce, naming what is wrong."""
    if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "final_alpha_cumprod"):
        raise ValueError(
            f"{type(scheduler).__name__} is not a DDIM-style scheduler (no alphas_cumprod/final_alpha_cumprod); "
            "DDPO samples with DDIMScheduler.from_config(pipeline.scheduler.config)"
        )
    config = scheduler.config
    if config.get("thresholding", False):
        raise ValueError(
            "dynamic thresholding is not supported: set thresholding=False in the scheduler config"
        )
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {config.get('prediction_type')!r}: only epsilon and v_prediction")


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_mean: bool = False,
) -> Any:
    """One DDIM step from ``sample`` (x_t) at ``timestep`` (an int, or one per sample) given the
    network's output. Returns ``(x_{t-1}, log p(x_{t-1} | x_t))`` with the log-probability ``(B,)``;
    with ``return_mean`` also the Gaussian's mean and std (``(prev, log_prob, mean, std)``: the KL
    between two policies' steps is ``(mean_1 - mean_2)^2 / (2 std^2)``). With ``prev_sample``
    given, that x_{t-1} is scored instead of a new one drawn (training). ``eta`` > 0: a
    deterministic step (eta = 0) has no density."""
    if eta <= 0:
        raise ValueError("eta must be > 0: a deterministic DDIM step has no log-probability")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) first")
    x_t = sample.float()
    out = model_output.float()
    b = x_t.shape[0]
    t = torch.as_tensor(timestep, device=x_t.device).long().reshape(-1).expand(b)
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - step
    alphas = scheduler.alphas_cumprod.float()
    alpha_t = _per_sample(alphas, t, x_t)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_prev = torch.where(
        (prev_t >= 0).reshape(-1, *([1] * (x_t.ndim - 1))),
        _per_sample(alphas, prev_t.clamp(min=0), x_t),
        final.to(x_t.device),
    )
    beta_t = 1 - alpha_t
    if scheduler.config.prediction_type == "epsilon":
        x0 = (x_t - beta_t.sqrt() * out) / alpha_t.sqrt()
        eps = out
    else:  # v_prediction
        x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * out
        eps = alpha_t.sqrt() * out + beta_t.sqrt() * x_t
    if scheduler.config.get("clip_sample", False):
        r = scheduler.config.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-r, r)  # the noise prediction stays as it was, as in diffusers' default
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=1e-20).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        prev = mean + std * noise
    else:
        prev = prev_sample.float()
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if return_mean:
        return prev, log_prob, mean, std
    return prev, log_prob
