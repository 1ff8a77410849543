"""Train an artifact classifier on cached features (see ``ArtifactConfig``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rewards.ml.artifact.config import ArtifactConfig
from rewards.ml.data import PairSet
from rewards.ml.heads import (
    DeviceFeatures,
    cosine_lr,
    resolve_device,
    standardiser_sample,
    torch_dtype,
    torch_threads,
)
from rewards.ml.metrics import holdout_metrics
from rewards.ml.model import ArtifactRewardModel
from rewards.ml.progress import Progress, ProgressLog, is_eval_epoch, run_epochs


def train(
    config: ArtifactConfig,
    train: PairSet,
    *,
    holdout: PairSet | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> ArtifactRewardModel:
    """Fit the classifier to ``train.artifact`` (samples labelled 0 or 1); ``holdout`` is evaluated at each
    epoch end. A ``TrainingCancelled`` raised by ``progress`` propagates unchanged."""
    config.validate()
    device, dtype = resolve_device(config.device), torch_dtype(config.dtype)
    if train.artifact is None:
        raise ValueError("the training data has no artifact labels")
    labels = np.asarray(train.artifact)
    labelled = np.flatnonzero(labels >= 0)
    n_pos = int((labels[labelled] == 1).sum())
    n_neg = int(labelled.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need both flagged and clean samples to train on (flagged {n_pos}, clean {n_neg})")
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)

        n = labelled.size
        index = torch.as_tensor(labelled, dtype=torch.long, device=device)
        y = torch.as_tensor(labels[labelled] == 1, device=device, dtype=dtype)
        # Class-balanced: each class carries half of the total weight.
        weight = torch.where(y == 1, n / (2.0 * n_pos), n / (2.0 * n_neg)).to(dtype)

        features = DeviceFeatures(train, device, dtype, config.use_prompt)
        model = ArtifactRewardModel(
            config=config.to_dict(),
            dim=train.dim,
            k=int(train.x.shape[1]),
            prompt_conditioned=features.prompt is not None,
        ).to(device=device, dtype=dtype)
        sample = standardiser_sample(labelled, rng)
        model.scorer.fit_standardiser(features.mean_inputs(torch.as_tensor(sample, device=device)))
        optimizer = torch.optim.AdamW(model.optimizer_groups(config.weight_decay), lr=config.lr)

        steps_per_epoch = math.ceil(n / config.batch_size)
        epochs = run_epochs(config, steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        log = ProgressLog(
            total_steps=total_steps, epochs=epochs, log_every_steps=config.log_every_steps, callback=progress
        )
        step = 0
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.as_tensor(rng.permutation(n), device=device)
            for start in range(0, n, config.batch_size):
                batch = order[start : start + config.batch_size]
                x, mask, prompt = features.take(index[batch])
                logit = model(x, mask, prompt)[:, 0]
                w = weight[batch]
                loss = (
                    w * F.binary_cross_entropy_with_logits(logit, y[batch], reduction="none")
                ).sum() / w.sum()

                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total_steps, config.lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                log.step_done(step, epoch, loss.item())
            model.eval()
            if is_eval_epoch(epoch, epochs):
                log.epoch_done(step, epoch, holdout_metrics(model, holdout))
        model.curves = log.curves
        model.eval()
        return model
