"""Diffusion GRPO, read top to bottom: groups of samples per prompt, group-standardised
advantages, the clipped ratio, and a KL term to the reference policy.

Each iteration:
1. **Sample** ``group_size`` images for each of ``prompts_per_iteration`` prompts (different noise,
   same prompt), every DDIM step's latent and log-probability recorded, in batches of
   ``train_batch_size`` (training recomputes each step on the same batch shapes: on-policy).
2. **Reward**: the reward function's scores, or with ``reward="pairwise"`` each image's win rate
   against the rest of its group under the Bradley-Terry model of those scores (Pref-GRPO: a
   pairwise platform's reward model says which of two is better, and win rates do not blow tiny
   score gaps up the way standardised raw scores do).
3. **Advantages**: standardised within each group (a group with no spread gives zeros: logged as
   ``zero_spread_groups``), clipped.
4. **Train** on a random ``train_fraction`` of the steps: PPO's clipped ratio loss, plus ``beta``
   times the KL between this step's Gaussian and the reference's (the same UNet with its LoRA
   adapter disabled; both share the step's std, so KL = (mu - mu_ref)^2 / (2 std^2), per element).

Written here because no maintained library has diffusion GRPO for diffusers pipelines (Flow-GRPO
and DanceGRPO are research code pinned to old diffusers). Flow-matching pipelines (SD3, Wan) need
the SDE form of the Euler step; this trainer takes DDIM pipelines, like DDPO.
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

from training.ml.diffusion.lora import (
    add_unet_lora,
    load_lora_into,
    resume_into,
    save_checkpoint,
    trainer_state,
)
from training.ml.diffusion.sampling import (
    Rollout,
    check_rewards,
    load_ddim_pipeline,
    sample_with_logprob,
    to_pil,
    unet_step,
)
from training.ml.diffusion_grpo.config import DiffusionGRPOConfig

RewardFn = Callable[[list[str], list[Any]], Sequence[float]]


@dataclass
class GRPOMetrics:
    """What one iteration logs; the reward parts separately (score and what was trained on)."""

    iteration: int
    score_mean: float  # the reward function's mean score
    reward_mean: float  # the reward trained on (the score, or the pairwise win rate)
    reward_std: float
    zero_spread_groups: float
    loss: float
    kl: float  # mean KL to the reference over trained steps (0 before the first update)
    approx_kl: float  # to the sampling policy: mean of (log p_old - log p_new)^2 / 2
    clip_fraction: float
    first_ratio_error: float  # max |ratio - 1| before the first optimizer step
    sample_seconds: float
    train_seconds: float
    images_per_second: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass
class GRPOResult:
    metrics: list[GRPOMetrics] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def group_win_rates(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each score's mean Bradley-Terry win probability against the other members of its group."""
    out = np.zeros_like(scores, dtype=np.float64)
    for g in np.unique(groups):
        m = np.flatnonzero(groups == g)
        s = scores[m]
        p = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))
        np.fill_diagonal(p, 0.0)
        out[m] = p.sum(1) / max(1, len(m) - 1)
    return out


def group_advantages(rewards: np.ndarray, groups: np.ndarray, *, clip: float) -> tuple[np.ndarray, float]:
    """Rewards standardised within each group, clipped; and the share of groups with no spread."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    flat = 0
    keys = np.unique(groups)
    for g in keys:
        m = groups == g
        std = rewards[m].std()
        flat += std < 1e-8
        adv[m] = 0.0 if std < 1e-8 else (rewards[m] - rewards[m].mean()) / std
    return np.clip(adv, -clip, clip), flat / max(1, len(keys))


def train(
    config: DiffusionGRPOConfig,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    output_dir: str | Path,
    progress: Callable[[GRPOMetrics], None] | None = None,
    resume_from: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GRPOResult:
    """Run diffusion GRPO on ``prompts``; checkpoints go to ``output_dir/checkpoint-<iteration>``."""
    config.validate()
    if not prompts:
        raise ValueError("no prompts to sample from")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    pipe = load_ddim_pipeline(config.pipeline, device=config.device, dtype=config.dtype)
    unet = pipe.unet
    params = add_unet_lora(unet, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    unet.eval()
    side = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    start = 0
    if resume_from is not None:
        start = resume_into(resume_from, unet, optimizer, rng, generator)
    elif config.init_lora:
        load_lora_into(unet, config.init_lora)
    out = Path(output_dir)
    result = GRPOResult()
    steps_trained = max(1, math.ceil(config.sample_steps * config.train_fraction))
    guidance, eta = config.guidance_scale, config.eta
    for iteration in range(start, config.iterations):
        if should_stop is not None and should_stop():
            break
        # 1. Sample groups, in the batches training will use.
        t0 = time.perf_counter()
        chosen = [prompts[rng.randrange(len(prompts))] for _ in range(config.prompts_per_iteration)]
        batch_prompts = [p for p in chosen for _ in range(config.group_size)]
        groups = np.repeat(np.arange(config.prompts_per_iteration), config.group_size)
        parts = [
            sample_with_logprob(
                pipe,
                batch_prompts[i : i + config.train_batch_size],
                steps=config.sample_steps,
                height=side,
                width=side,
                generator=generator,
                guidance_scale=guidance,
                eta=eta,
            )
            for i in range(0, len(batch_prompts), config.train_batch_size)
        ]
        rollout = Rollout.cat(parts)
        sample_seconds = time.perf_counter() - t0

        # 2. Reward. 3. Advantages within groups.
        scores = check_rewards(reward_fn(batch_prompts, to_pil(rollout.images)), len(batch_prompts))
        rewards = group_win_rates(scores, groups) if config.reward == "pairwise" else scores
        adv_np, zero_spread = group_advantages(rewards, groups, clip=config.adv_clip_max)
        adv = torch.as_tensor(adv_np, dtype=torch.float32, device=config.device)

        # 4. Train.
        t1 = time.perf_counter()
        losses, kls, approx, clipped, first_error = [], [], [], [], 0.0
        n, stepped = len(batch_prompts), False
        for epoch in range(config.inner_epochs):
            order = (
                torch.arange(n)
                if epoch == 0
                else torch.randperm(n, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            )
            for i in range(0, n, config.train_batch_size):
                idx = order[i : i + config.train_batch_size]
                batch = rollout.select(idx)
                steps = sorted(rng.sample(range(config.sample_steps), steps_trained))
                for j in steps:
                    args = (
                        pipe,
                        batch.latents[:, j],
                        batch.timesteps[j],
                        batch.embeds,
                        batch.negative_embeds,
                    )
                    _, log_prob, mean, std = unet_step(
                        *args,
                        prev_latents=batch.latents[:, j + 1],
                        return_mean=True,
                        guidance_scale=guidance,
                        eta=eta,
                    )
                    old = batch.log_probs[:, j]
                    ratio = torch.exp(log_prob - old)
                    a = adv[idx]
                    loss = torch.maximum(
                        -a * ratio, -a * torch.clamp(ratio, 1 - config.clip_range, 1 + config.clip_range)
                    ).mean()
                    kl = torch.zeros((), device=loss.device)
                    if config.beta > 0:
                        with torch.no_grad():
                            unet.disable_adapters()
                            try:
                                _, _, ref_mean, _ = unet_step(
                                    *args,
                                    prev_latents=batch.latents[:, j + 1],
                                    return_mean=True,
                                    guidance_scale=guidance,
                                    eta=eta,
                                )
                            finally:
                                unet.enable_adapters()
                        per = ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.ndim)))
                        kl = per.mean()
                        loss = loss + config.beta * kl
                    (loss / len(steps)).backward()
                    if not stepped:
                        first_error = max(first_error, float((ratio.detach() - 1).abs().max()))
                    losses.append(float(loss.detach()))
                    kls.append(float(kl.detach()))
                    approx.append(float(0.5 * ((log_prob.detach() - old) ** 2).mean()))
                    clipped.append(float(((ratio.detach() - 1).abs() > config.clip_range).float().mean()))
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stepped = True
        train_seconds = time.perf_counter() - t1
        metrics = GRPOMetrics(
            iteration=iteration + 1,
            score_mean=float(scores.mean()),
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()),
            zero_spread_groups=zero_spread,
            loss=float(np.mean(losses)),
            kl=float(np.mean(kls)),
            approx_kl=float(np.mean(approx)),
            clip_fraction=float(np.mean(clipped)),
            first_ratio_error=first_error,
            sample_seconds=sample_seconds,
            train_seconds=train_seconds,
            images_per_second=n / (sample_seconds + train_seconds),
        )
        result.metrics.append(metrics)
        if progress is not None:
            progress(metrics)
        if iteration + 1 == config.iterations or (
            config.checkpoint_every and (iteration + 1) % config.checkpoint_every == 0
        ):
            state = trainer_state(optimizer, rng, generator, iteration + 1)
            path = save_checkpoint(
                type(pipe), unet, out / f"checkpoint-{iteration + 1}", config=config.to_dict(), state=state,
                files={"metrics.json": json.dumps([m.to_dict() for m in result.metrics])},
            )  # fmt: skip
            result.checkpoints.append(path)
    return result
