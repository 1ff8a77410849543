"""Train a Bradley-Terry reward head on cached features (see ``BTConfig``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from rewards.ml.bt.config import BTConfig
from rewards.ml.data import PairSet
from rewards.ml.heads import (
    BestWeights,
    DeviceFeatures,
    cosine_lr,
    fit_summary,
    head_temperatures,
    initial_tie_param,
    inner_split,
    l2_penalty,
    pair_differences,
    pair_nll,
    pair_targets,
    resolve_device,
    resolve_l2,
    standardiser_sample,
    torch_dtype,
    torch_threads,
)
from rewards.ml.metrics import holdout_metrics
from rewards.ml.model import BTRewardModel
from rewards.ml.progress import Progress, ProgressLog, is_eval_epoch, run_epochs


def train(
    config: BTConfig,
    train: PairSet,
    *,
    holdout: PairSet | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> BTRewardModel:
    """Fit a Bradley-Terry head to ``train``'s pairs; ``holdout`` is evaluated at each epoch end.

    An inner validation split of ``train`` (``config.val_fraction``, by comparison) decides when to stop
    and which epoch's weights to keep, and fits the temperature; ``holdout`` is only reported on.
    A ``TrainingCancelled`` raised by ``progress`` propagates unchanged.
    """
    config.validate()
    device, dtype = resolve_device(config.device), torch_dtype(config.dtype)
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)

        # Pairs: targets 1 / 0 (tie) / -1, weight 0 for what the config drops.
        target, weight = pair_targets(train.outcome, train.weight, ties=config.ties, both_bad=config.both_bad)
        keep = np.flatnonzero(weight > 0)
        if not keep.size:
            raise ValueError("no pairs to train on: every pair is missing, dropped both-bad or a dropped tie")
        groups = None if train.comparison is None else train.comparison[keep]
        fit, val = inner_split(
            keep.size, groups, fraction=config.val_fraction, min_pairs=config.min_val_pairs, seed=config.seed
        )
        resolved = dataclasses.replace(config, l2=resolve_l2(config.l2, fit.size))
        l2 = float(resolved.l2 or 0.0)
        a = torch.as_tensor(train.a[keep], dtype=torch.long, device=device)
        b = torch.as_tensor(train.b[keep], dtype=torch.long, device=device)
        target_t = torch.as_tensor(target[keep], device=device)[:, None]
        weight_t = torch.as_tensor(weight[keep], device=device, dtype=dtype)[:, None]
        fit_t, val_t = torch.as_tensor(fit, device=device), torch.as_tensor(val, device=device)

        # Features go to the device once; each step gathers its batch from them.
        features = DeviceFeatures(train, device, dtype, config.use_prompt)
        model = BTRewardModel(
            config=resolved.to_dict(),
            dim=train.dim,
            k=int(train.x.shape[1]),
            prompt_conditioned=features.prompt is not None,
        ).to(device=device, dtype=dtype)
        sample = standardiser_sample(np.concatenate([train.a[keep], train.b[keep]]), rng)
        model.scorer.fit_standardiser(features.mean_inputs(torch.as_tensor(sample, device=device)))
        optimizer = torch.optim.AdamW(model.optimizer_groups(config.weight_decay), lr=config.lr)
        assert model.tie_param is not None
        with torch.no_grad():
            model.tie_param.copy_(torch.as_tensor(initial_tie_param(target[keep, None], weight[keep, None])))

        n = fit.size
        steps_per_epoch = math.ceil(n / config.batch_size)
        epochs = run_epochs(config, steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        log = ProgressLog(
            total_steps=total_steps, epochs=epochs, log_every_steps=config.log_every_steps, callback=progress
        )
        best = BestWeights(config.patience)
        step = 0
        for epoch in range(1, epochs + 1):
            model.train()
            order = fit_t[torch.as_tensor(rng.permutation(n), device=device)]
            for start in range(0, n, config.batch_size):
                batch = order[start : start + config.batch_size]
                x, mask, prompt = features.take(torch.cat([a[batch], b[batch]]))
                r_a, r_b = model(x, mask, prompt).split(len(batch))
                loss = pair_nll(r_a - r_b, target_t[batch], weight_t[batch], model.tie_param, config.ties)
                if l2:
                    loss = loss + l2 * l2_penalty(model)

                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total_steps, config.lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                log.step_done(step, epoch, loss.item())
            model.eval()
            figures: dict[str, float] = {}
            stop = False
            if val.size:
                d = pair_differences(model, features, a[val_t], b[val_t])
                figures["val_loss"] = float(
                    pair_nll(d, target_t[val_t], weight_t[val_t], model.tie_param.detach(), config.ties)
                )
                stop = best.update(figures["val_loss"], model, epoch)
            last = stop or epoch == epochs
            if last and val.size:
                best.restore(model)
                if config.calibrate:
                    d = pair_differences(model, features, a[val_t], b[val_t])
                    model.set_temperature(
                        head_temperatures(
                            d, target_t[val_t], weight_t[val_t], model.tie_param, config.ties, shared=False
                        )
                    )
            if last or is_eval_epoch(epoch, epochs):
                log.epoch_done(step, epoch, {**figures, **holdout_metrics(model, holdout)})
            if stop:
                break
        model.curves = log.curves
        model.fit_summary = fit_summary(model, best, fit.size, val.size, epoch, l2)
        model.eval()
        return model
