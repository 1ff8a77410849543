"""DDPO, read top to bottom: sample with log-probabilities, score, normalise, PPO-clip update.

Each iteration:
1. **Sample** ``batch_size`` images (``prompts_per_iteration`` prompts x ``images_per_prompt``) with
   DDIM (eta > 0), recording every step's latent and log-probability (``diffusion.sampling``), in
   batches of ``train_batch_size`` so that training recomputes each step on the same batch shapes.
2. **Score** them with the reward function ``(prompts, images) -> list[float]`` (ours:
   ``rewards.ml.reward_fn.RewardFunction``). Rewards are untrusted: a NaN or a wrong count fails
   the run with the reason.
3. **Advantages**: each reward minus the mean of its prompt's images, over their standard deviation
   (``per_prompt_advantage``; else over the whole batch), clipped to ``adv_clip_max``.
4. **Train** ``inner_epochs`` passes: for each batch and each of a random ``timestep_fraction`` of
   the steps, the step's log-probability under the current weights, the ratio to the sampled one,
   PPO's clipped loss, gradients accumulated over the steps, then one AdamW step on the LoRA
   weights. The first pass keeps the sampling batches, so before the first optimizer step the
   ratio is exactly 1: the run is on-policy (``first_ratio_error`` records the largest |ratio - 1|).

Written here because no maintained library has it: TRL removed DDPO in 0.24, diffusers has no RL
trainers. The math follows Black et al. 2023 (DDPO_IS, the clipped importance-sampling variant).
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

from training.ml.ddpo.config import DDPOConfig
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

RewardFn = Callable[[list[str], list[Any]], Sequence[float]]


@dataclass
class IterationMetrics:
    """What one iteration logs (also what the job stores per step)."""

    iteration: int
    reward_mean: float
    reward_std: float
    zero_spread_groups: float  # share of prompts whose images all got the same reward
    loss: float
    approx_kl: float  # mean of (log p_old - log p_new)^2 / 2 over trained steps
    clip_fraction: float  # share of trained steps whose ratio left [1 - clip, 1 + clip]
    first_ratio_error: float  # max |ratio - 1| before this iteration's first optimizer step
    sample_seconds: float
    train_seconds: float
    images_per_second: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass
class DDPOResult:
    metrics: list[IterationMetrics] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def advantages(
    rewards: np.ndarray, groups: np.ndarray, *, per_group: bool, clip: float
) -> tuple[np.ndarray, float]:
    """Rewards standardised within each group (or the batch), clipped; and the share of groups
    whose rewards have no spread (their advantages are all 0: nothing to learn from)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    flat = 0
    keys = np.unique(groups)
    for g in keys:
        m = groups == g
        spread = rewards[m].std()
        flat += spread < 1e-8
    if per_group:
        for g in keys:
            m = groups == g
            adv[m] = (rewards[m] - rewards[m].mean()) / (rewards[m].std() + 1e-8)
    else:
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    return np.clip(adv, -clip, clip), flat / max(1, len(keys))


def train(
    config: DDPOConfig,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    output_dir: str | Path,
    progress: Callable[[IterationMetrics], None] | None = None,
    resume_from: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DDPOResult:
    """Run DDPO on ``prompts``; checkpoints go to ``output_dir/checkpoint-<iteration>``."""
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
    unet.eval()  # no dropout: sampling and training must compute the same function
    scale = pipe.vae_scale_factor
    side = config.resolution or unet.config.sample_size * scale
    start = 0
    if resume_from is not None:
        start = resume_into(resume_from, unet, optimizer, rng, generator)
    elif config.init_lora:
        load_lora_into(unet, config.init_lora)
    out = Path(output_dir)
    result = DDPOResult()
    steps_trained = max(1, math.ceil(config.sample_steps * config.timestep_fraction))
    for iteration in range(start, config.iterations):
        if should_stop is not None and should_stop():
            break
        # 1. Sample, in batches the size training will use.
        t0 = time.perf_counter()
        chosen = [prompts[rng.randrange(len(prompts))] for _ in range(config.prompts_per_iteration)]
        batch_prompts = [p for p in chosen for _ in range(config.images_per_prompt)]
        groups = np.repeat(np.arange(config.prompts_per_iteration), config.images_per_prompt)
        parts = []
        for i in range(0, len(batch_prompts), config.train_batch_size):
            parts.append(
                sample_with_logprob(
                    pipe,
                    batch_prompts[i : i + config.train_batch_size],
                    steps=config.sample_steps,
                    guidance_scale=config.guidance_scale,
                    eta=config.eta,
                    height=side,
                    width=side,
                    generator=generator,
                )
            )
        rollout = Rollout.cat(parts)
        sample_seconds = time.perf_counter() - t0

        # 2. Score. 3. Advantages.
        rewards = check_rewards(reward_fn(batch_prompts, to_pil(rollout.images)), len(batch_prompts))
        adv_np, zero_spread = advantages(
            rewards, groups, per_group=config.per_prompt_advantage, clip=config.adv_clip_max
        )
        adv = torch.as_tensor(adv_np, dtype=torch.float32, device=config.device)

        # 4. Train.
        t1 = time.perf_counter()
        losses, kls, clipped, first_error = [], [], [], 0.0
        n = len(batch_prompts)
        stepped = False
        for epoch in range(config.inner_epochs):
            # The first pass keeps the sampling batches (same shapes: the ratio is exactly 1 before
            # the first update); later passes shuffle.
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
                    _, log_prob = unet_step(
                        pipe,
                        batch.latents[:, j],
                        batch.timesteps[j],
                        batch.embeds,
                        batch.negative_embeds,
                        guidance_scale=config.guidance_scale,
                        eta=config.eta,
                        prev_latents=batch.latents[:, j + 1],
                    )
                    old = batch.log_probs[:, j]
                    ratio = torch.exp(log_prob - old)
                    a = adv[idx]
                    loss = torch.maximum(
                        -a * ratio, -a * torch.clamp(ratio, 1 - config.clip_range, 1 + config.clip_range)
                    ).mean()
                    (loss / len(steps)).backward()
                    if not stepped:
                        first_error = max(first_error, float((ratio.detach() - 1).abs().max()))
                    losses.append(float(loss.detach()))
                    kls.append(float(0.5 * ((log_prob.detach() - old) ** 2).mean()))
                    clipped.append(float(((ratio.detach() - 1).abs() > config.clip_range).float().mean()))
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stepped = True
        train_seconds = time.perf_counter() - t1
        metrics = IterationMetrics(
            iteration=iteration + 1,
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()),
            zero_spread_groups=zero_spread,
            loss=float(np.mean(losses)),
            approx_kl=float(np.mean(kls)),
            clip_fraction=float(np.mean(clipped)),
            first_ratio_error=first_error,
            sample_seconds=sample_seconds,
            train_seconds=train_seconds,
            images_per_second=n / (sample_seconds + train_seconds),
        )
        result.metrics.append(metrics)
        if progress is not None:
            progress(metrics)
        last = iteration + 1 == config.iterations
        if last or (config.checkpoint_every and (iteration + 1) % config.checkpoint_every == 0):
            state = trainer_state(optimizer, rng, generator, iteration + 1)
            path = save_checkpoint(
                type(pipe),
                unet,
                out / f"checkpoint-{iteration + 1}",
                config=config.to_dict(),
                state=state,
                files={"metrics.json": json.dumps([m.to_dict() for m in result.metrics])},
            )
            result.checkpoints.append(path)
    return result
