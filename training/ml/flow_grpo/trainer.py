"""Flow GRPO, read top to bottom: diffusion GRPO on a flow-matching pipeline (SD3-like images,
Wan-like videos), each step's log-probability from the SDE form of the Euler step.

Each iteration:
1. **Sample** ``group_size`` outputs for each of ``prompts_per_iteration`` prompts with
   ``sample_steps`` SDE steps (``training.ml.diffusion.flow``), every latent and log-probability
   recorded, in batches of ``train_batch_size`` (training recomputes each step on the same batch
   shapes, so the ratio before the first update is exactly 1).
2. **Reward** the decoded images, or the videos as lists of frames (the reward function embeds
   them the way it embeds a clip); or each output's Bradley-Terry win rate in its group.
3. **Advantages** standardised within each group, clipped.
4. **Train** on a random ``train_fraction`` of the steps: PPO's clipped ratio, plus ``beta`` times
   the KL to the reference (the transformer with its LoRA adapter disabled; the two Gaussians
   share their std, so KL = (mu - mu_ref)^2 / (2 std^2) per element).
5. **Evaluate** (``eval_every``): the plain pipeline, ``eval_steps`` deterministic Euler steps, on
   fixed prompts and seeds; what a user of the checkpoint will see.

Written here because no maintained library has Flow-GRPO for current diffusers (flow_grpo and
DanceGRPO are research code pinned to old versions). The loop is diffusion_grpo/trainer.py's with
the flow step in place of the DDIM step; the group reward and advantage helpers are shared.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.ml.diffusion.flow import (
    FlowRollout,
    flow_step,
    is_video,
    load_flow_pipeline,
    sample_flow_with_logprob,
)
from training.ml.diffusion.lora import (
    add_unet_lora,
    load_lora_into,
    resume_into,
    save_checkpoint,
    trainer_state,
)
from training.ml.diffusion.sampling import check_rewards, to_pil
from training.ml.diffusion_grpo.trainer import GRPOMetrics, GRPOResult, group_advantages, group_win_rates
from training.ml.flow_grpo.config import FlowGRPOConfig

RewardFn = Callable[[list[str], list[Any]], Sequence[float]]


@dataclass
class FlowGRPOMetrics(GRPOMetrics):
    """GRPO's metrics (``images_per_second`` counts videos for video runs) and, on evaluated
    iterations, the plain pipeline's mean score on the fixed evaluation prompts."""

    eval_score: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items() if v is not None}


def outputs_for_reward(outputs: torch.Tensor) -> list[Any]:
    """Images (B, 3, H, W) as PIL images; videos (B, F, 3, H, W) as lists of PIL frames."""
    if outputs.ndim == 5:
        return [to_pil(video) for video in outputs]
    return to_pil(outputs)


def side_of(pipe: Any, config: FlowGRPOConfig) -> int:
    if config.resolution:
        return config.resolution
    if is_video(pipe):
        raise ValueError("resolution must be set for a video pipeline")
    return int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def evaluate(pipe: Any, config: FlowGRPOConfig, prompts: list[str], reward_fn: RewardFn, side: int) -> float:
    """Mean score of the plain pipeline's outputs (``eval_steps`` Euler steps, seeds 0..n-1)."""
    kwargs: dict[str, Any] = {"height": side, "width": side}
    if is_video(pipe):
        kwargs["num_frames"] = config.frames
    outputs: list[Any] = []
    for i, prompt in enumerate(prompts):
        result = pipe(
            prompt,
            num_inference_steps=config.eval_steps,
            guidance_scale=config.guidance_scale,
            generator=torch.Generator(device=config.device).manual_seed(i),
            output_type="pil",
            **kwargs,
        )
        outputs.append(result.frames[0] if is_video(pipe) else result.images[0])
    return float(check_rewards(reward_fn(prompts, outputs), len(prompts)).mean())


def train(
    config: FlowGRPOConfig,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    output_dir: str | Path,
    progress: Callable[[FlowGRPOMetrics], None] | None = None,
    resume_from: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GRPOResult:
    """Run flow GRPO on ``prompts``; checkpoints go to ``output_dir/checkpoint-<iteration>``."""
    config.validate()
    if not prompts:
        raise ValueError("no prompts to sample from")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    pipe = load_flow_pipeline(config.pipeline, device=config.device, dtype=config.dtype)
    if is_video(pipe) != (config.frames > 1):
        kind = "video" if is_video(pipe) else "image"
        raise ValueError(
            f"{config.pipeline} is a text-to-{kind} pipeline; frames={config.frames} does not fit"
        )
    transformer = pipe.transformer
    params = add_unet_lora(
        transformer, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets
    )
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    transformer.eval()
    side = side_of(pipe, config)
    start = 0
    if resume_from is not None:
        start = resume_into(resume_from, transformer, optimizer, rng, generator, component="transformer")
    elif config.init_lora:
        load_lora_into(transformer, config.init_lora, component="transformer")
    out = Path(output_dir)
    result = GRPOResult()
    steps_trained = max(1, math.ceil(config.sample_steps * config.train_fraction))
    guidance, noise = config.guidance_scale, config.noise_level
    eval_prompts = list(prompts[: config.prompts_per_iteration])
    for iteration in range(start, config.iterations):
        if should_stop is not None and should_stop():
            break
        # 1. Sample groups, in the batches training will use.
        t0 = time.perf_counter()
        chosen = [prompts[rng.randrange(len(prompts))] for _ in range(config.prompts_per_iteration)]
        batch_prompts = [p for p in chosen for _ in range(config.group_size)]
        groups = np.repeat(np.arange(config.prompts_per_iteration), config.group_size)
        parts = [
            sample_flow_with_logprob(
                pipe,
                batch_prompts[i : i + config.train_batch_size],
                steps=config.sample_steps,
                guidance_scale=guidance,
                noise_level=noise,
                height=side,
                width=side,
                frames=config.frames,
                generator=generator,
            )
            for i in range(0, len(batch_prompts), config.train_batch_size)
        ]
        rollout = FlowRollout.cat(parts)
        sample_seconds = time.perf_counter() - t0

        # 2. Reward. 3. Advantages within groups.
        scores = check_rewards(
            reward_fn(batch_prompts, outputs_for_reward(rollout.outputs)), len(batch_prompts)
        )
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
                    args = (pipe, batch.latents[:, j], j, batch.timesteps, batch.sigmas, batch.cond)
                    step_kwargs: dict[str, Any] = {
                        "guidance_scale": guidance,
                        "noise_level": noise,
                        "prev_latents": batch.latents[:, j + 1],
                        "return_mean": True,
                    }
                    _, log_prob, mean, std = flow_step(*args, **step_kwargs)
                    old = batch.log_probs[:, j]
                    ratio = torch.exp(log_prob - old)
                    a = adv[idx]
                    loss = torch.maximum(
                        -a * ratio, -a * torch.clamp(ratio, 1 - config.clip_range, 1 + config.clip_range)
                    ).mean()
                    kl = torch.zeros((), device=loss.device)
                    if config.beta > 0:
                        with torch.no_grad():
                            transformer.disable_adapters()
                            try:
                                _, _, ref_mean, _ = flow_step(*args, **step_kwargs)
                            finally:
                                transformer.enable_adapters()
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

        # 5. Evaluate with the plain pipeline.
        last = iteration + 1 == config.iterations
        eval_score = None
        if config.eval_every and (last or (iteration + 1) % config.eval_every == 0):
            eval_score = evaluate(pipe, config, eval_prompts, reward_fn, side)
        metrics = FlowGRPOMetrics(
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
            eval_score=eval_score,
        )
        result.metrics.append(metrics)
        if progress is not None:
            progress(metrics)
        if last or (config.checkpoint_every and (iteration + 1) % config.checkpoint_every == 0):
            state = trainer_state(optimizer, rng, generator, iteration + 1)
            path = save_checkpoint(
                type(pipe), transformer, out / f"checkpoint-{iteration + 1}", config=config.to_dict(),
                state=state, files={"metrics.json": json.dumps([m.to_dict() for m in result.metrics])},
                component="transformer",
            )  # fmt: skip
            result.checkpoints.append(path)
    return result
