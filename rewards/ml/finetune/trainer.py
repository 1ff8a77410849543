"""Fine-tune a CLIP/SigLIP image tower together with a linear Bradley-Terry head (see ``FinetuneConfig``).

Top to bottom: LoRA without peft (``LoRALinear``, ``add_lora``, ``merge_lora``), the ``last_layers``
alternative (``unfreeze_last_layers``), the data (``ImagePairs``), the loop (``train``), and the result
(``FinetunedRewardModel``, ``load_finetuned``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rewards.ml.bt.config import BTConfig
from rewards.ml.data import PairSet
from rewards.ml.encoders import Encoder, EncoderError, inspect_encoder, load_encoder
from rewards.ml.finetune.config import FinetuneConfig
from rewards.ml.heads import (
    cosine_lr,
    initial_tie_param,
    pair_nll,
    pair_targets,
    resolve_device,
    scorer_inputs,
    standardiser_sample,
    torch_threads,
)
from rewards.ml.metrics import holdout_metrics
from rewards.ml.model import BTRewardModel, load_reward_model
from rewards.ml.progress import ConfigError, Progress, ProgressLog, is_eval_epoch, run_epochs

ENCODER_DIR = "encoder"  # the fine-tuned encoder's sub-directory of a saved model
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Which sub-module of a vision layer holds each LoRA target.
TARGET_PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "out_proj": "self_attn",
    "fc1": "mlp",
    "fc2": "mlp",
}
STANDARDISER_SAMPLES = 1024  # images embedded (no grad) before training to set the head's input scaling
EVAL_BATCH_SIZE = 64


# --- LoRA ------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + (alpha / rank) * B(A(x))``.

    This is LoRA (Hu et al., 2021) in the formulation of peft's ``lora.Linear`` (A Kaiming-uniform, B zeros,
    scaling ``alpha / rank``; no dropout), without the dependency. B starts at zero, so before the first
    optimiser step the layer computes exactly what ``base`` does. ``merge()`` folds the update into
    ``base.weight`` and returns ``base``, a plain ``nn.Linear`` again.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / rank) * B @ A`` that ``merge`` adds to ``base.weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP/SigLIP model's vision tower, first to last."""
    layers = getattr(getattr(getattr(model, "vision_model", None), "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EncoderError(
            f"{type(model).__name__} has no vision_model.encoder.layers: not a CLIP/SigLIP model"
        )
    return layers


def _last(layers: nn.ModuleList, n: int | None, field: str) -> list[nn.Module]:
    if n is not None and n > len(layers):
        raise ConfigError(field, f"the encoder has {len(layers)} vision layers, got {n}")
    return list(layers) if n is None else list(layers)[-n:]


def add_lora(
    model: nn.Module, *, layers: int | None, targets: Sequence[str], rank: int, alpha: float
) -> list[LoRALinear]:
    """Replace the ``targets`` linears of the last ``layers`` vision layers (None = all) with ``LoRALinear``
    wrappers, in place, and return them. Everything else keeps its ``requires_grad``."""
    adapters = []
    for layer in _last(vision_layers(model), layers, "lora_layers"):
        for name in targets:
            parent = getattr(layer, TARGET_PARENTS[name])
            base = getattr(parent, name)
            if not isinstance(base, nn.Linear):
                raise EncoderError(
                    f"{type(layer).__name__}.{TARGET_PARENTS[name]}.{name} is not a linear layer"
                )
            adapter = LoRALinear(base, rank=rank, alpha=alpha)
            setattr(parent, name, adapter)
            adapters.append(adapter)
    return adapters


def merge_lora(model: nn.Module) -> int:
    """Fold every ``LoRALinear`` of ``model`` into its base linear, in place, and put the plain linear back,
    so the model's state dict has its original keys. Returns how many adapters were merged."""
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merge())
                merged += 1
    return merged


def unfreeze_last_layers(model: nn.Module, n: int) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the last ``n`` vision layers and on everything after them on the way to the
    image embedding (post-layernorm, SigLIP's pooling head, CLIP's visual projection); return those params."""
    modules = _last(vision_layers(model), n, "train_layers")
    vision: Any = model.vision_model
    modules.append(vision.post_layernorm)
    for after in (getattr(vision, "head", None), getattr(model, "visual_projection", None)):
        if isinstance(after, nn.Module):
            modules.append(after)
    params = [p for module in modules for p in module.parameters()]
    for param in params:
        param.requires_grad_(True)
    return params


# --- Data ------------------------------------------------------------------------------------------


@dataclass
class ImagePairs:
    """S images and P judged pairs over them: a ``PairSet`` with the images themselves instead of cached
    features.

    ``prompts`` holds one prompt per image (None: not prompt-conditioned). ``a``/``b`` are ``(P,)`` indices
    into ``images``, ``outcome`` the ``(P,)`` codes of ``rewards.ml.data`` (A_WINS, B_WINS, TIE, ...),
    ``weight`` ``(P,)`` float (1.0 for one vote).
    """

    images: Sequence[Image.Image]
    prompts: Sequence[str] | None
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    weight: np.ndarray

    def __post_init__(self) -> None:
        s = len(self.images)
        if self.prompts is not None and len(self.prompts) != s:
            raise ValueError(f"prompts must have one entry per image ({s}), got {len(self.prompts)}")
        self.a = np.asarray(self.a, dtype=np.int64)
        self.b = np.asarray(self.b, dtype=np.int64)
        self.outcome = np.asarray(self.outcome, dtype=np.int8)
        self.weight = np.asarray(self.weight, dtype=np.float32)
        if self.a.ndim != 1:
            raise ValueError(f"a must have shape (P,), got {self.a.shape}")
        p = self.a.shape[0]
        for name in ("b", "outcome", "weight"):
            if getattr(self, name).shape != (p,):
                raise ValueError(f"{name} must have shape ({p},)")
        if p and (min(self.a.min(), self.b.min()) < 0 or max(self.a.max(), self.b.max()) >= s):
            raise ValueError(f"pair indices out of range of the {s} images")

    @property
    def num_pairs(self) -> int:
        return int(self.a.shape[0])


# --- Training --------------------------------------------------------------------------------------


def train(
    config: FinetuneConfig,
    pairs: ImagePairs,
    *,
    encoder_path: str | Path,
    holdout: ImagePairs | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> FinetunedRewardModel:
    """Fine-tune the image tower of the encoder at ``encoder_path`` and a bt head on ``pairs``, end to end.

    The encoder is loaded with ``rewards.ml.encoders.load_encoder`` (float32 weights on ``config.device``;
    ``config.dtype`` only sets the autocast dtype). ``holdout`` is evaluated (float32, like the saved model)
    at each evaluation epoch and reported as ``holdout_*`` metrics. A ``TrainingCancelled`` raised by
    ``progress`` propagates unchanged. Raises ``ConfigError`` for a bad config (also a layer count the encoder
    does not have), ``EncoderError`` for an unusable encoder (a text encoder included) and ``ValueError`` for
    unusable data.
    """
    config.validate()
    device = resolve_device(config.device)
    autocast = AUTOCAST[config.dtype]
    prompt_conditioned = config.use_prompt and pairs.prompts is not None
    if prompt_conditioned and holdout is not None and holdout.prompts is None:
        raise ValueError("the training pairs have prompts, so the holdout pairs need them too")
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)

        # Pairs: targets 1 / 0 (tie) / -1; what the config drops is left out.
        target, weight = pair_targets(pairs.outcome, pairs.weight, ties=config.ties, both_bad=config.both_bad)
        keep = np.flatnonzero(weight > 0)
        if not keep.size:
            raise ValueError("no pairs to train on: every pair is missing, dropped both-bad or a dropped tie")
        a, b = pairs.a[keep], pairs.b[keep]
        target_t = torch.as_tensor(target[keep], device=device)[:, None]
        weight_t = torch.as_tensor(weight[keep], device=device)[:, None]

        # The same loading path as the frozen-feature kinds; float32 master weights, autocast does the rest.
        encoder = load_encoder(encoder_path, device=config.device, dtype="float32")
        if encoder.image_processor is None:
            raise EncoderError(
                f"{encoder.info.path}: a {encoder.info.family} encoder has no image tower to fine-tune"
            )
        model = encoder.model
        model.requires_grad_(False)
        if config.method == "lora":
            adapters = add_lora(
                model,
                layers=config.lora_layers,
                targets=config.lora_targets,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
            )
            trained = [p for adapter in adapters for p in (adapter.lora_A, adapter.lora_B)]
        else:
            trained = unfreeze_last_layers(model, config.train_layers)
        trained_names = [name for name, p in model.named_parameters() if p.requires_grad]

        # The text tower is frozen: each distinct prompt is embedded once.
        prompts = None
        if prompt_conditioned:
            assert pairs.prompts is not None
            prompts = torch.as_tensor(_prompt_vectors(encoder, pairs.prompts), device=device)
        holdout_prompts = None
        if prompt_conditioned and holdout is not None and holdout.prompts is not None:
            holdout_prompts = _prompt_vectors(encoder, holdout.prompts)

        head = BTRewardModel(
            config=_head_config(config), dim=encoder.info.dim, k=1, prompt_conditioned=prompt_conditioned
        ).to(device)
        # Scale the head's inputs from the encoder's embeddings before any fine-tuning (see heads.Scorer).
        sample = standardiser_sample(np.concatenate([a, b]), rng, size=STANDARDISER_SAMPLES)
        model.eval()
        with torch.no_grad():
            x0 = torch.cat(
                [
                    _embed_batch(encoder, [pairs.images[i] for i in chunk], autocast)
                    for chunk in np.array_split(sample, math.ceil(sample.size / EVAL_BATCH_SIZE))
                ]
            )
            prompt0 = None if prompts is None else prompts[torch.as_tensor(sample, device=device)]
            head.scorer.fit_standardiser(scorer_inputs(x0, prompt0))
            assert head.tie_param is not None
            head.tie_param.copy_(torch.as_tensor(initial_tie_param(target[keep, None], weight[keep, None])))

        optimizer = torch.optim.AdamW(
            [
                {"params": trained, "weight_decay": config.weight_decay, "peak_lr": config.lr},
                *(
                    {**group, "peak_lr": config.head_lr}
                    for group in head.optimizer_groups(config.weight_decay)
                ),
            ],
            lr=config.lr,
        )
        clipped = trained + list(head.parameters())
        # float16 gradients underflow without loss scaling; bfloat16 has float32's exponent range.
        scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")
        if config.grad_checkpointing:
            model.activation_checkpointing_enable()

        n = keep.size
        steps_per_epoch = math.ceil(n / config.batch_size)
        epochs = run_epochs(config, steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        log = ProgressLog(
            total_steps=total_steps, epochs=epochs, log_every_steps=config.log_every_steps, callback=progress
        )
        step = 0
        try:
            for epoch in range(1, epochs + 1):
                model.train()
                head.train()
                order = rng.permutation(n)
                for start in range(0, n, config.batch_size):
                    batch = order[start : start + config.batch_size]
                    # Embed each distinct image of the batch once, then gather both sides of every pair.
                    sides = np.concatenate([a[batch], b[batch]])
                    used, inverse = np.unique(sides, return_inverse=True)
                    x = _embed_batch(encoder, [pairs.images[i] for i in used], autocast)
                    x = x[torch.as_tensor(inverse, device=device)]
                    prompt = None if prompts is None else prompts[torch.as_tensor(sides, device=device)]
                    mask = torch.ones((x.shape[0], 1), dtype=torch.bool, device=device)
                    r_a, r_b = head(x[:, None, :], mask, prompt).split(len(batch))
                    batch_t = torch.as_tensor(batch, device=device)
                    loss = pair_nll(
                        r_a - r_b, target_t[batch_t], weight_t[batch_t], head.tie_param, config.ties
                    )

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
                model.eval()
                head.eval()
                if is_eval_epoch(epoch, epochs):
                    metrics = {}
                    if holdout is not None:
                        metrics = holdout_metrics(head, _embedded_pairs(encoder, holdout, holdout_prompts))
                    log.epoch_done(step, epoch, metrics)
        finally:
            if config.grad_checkpointing:
                model.activation_checkpointing_disable()
            model.eval()
        head.curves = log.curves
        head.eval()
        base = {
            "path": encoder.info.path,
            "name": encoder.info.name,
            "fingerprint": encoder.info.fingerprint,
            "family": encoder.info.family,
            "model_type": encoder.info.model_type,
        }
        return FinetunedRewardModel(
            encoder=encoder, head=head, config=config, base=base, trained_parameters=trained_names
        )


def _embed_batch(
    encoder: Encoder, images: Sequence[Image.Image], autocast: torch.dtype | None
) -> torch.Tensor:
    """``(N, D)`` float32 L2-normalised image embeddings with gradients: ``Encoder.embed_images`` without
    ``inference_mode`` (same image processor, same features, same normalisation)."""
    assert encoder.image_processor is not None
    inputs = encoder.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    inputs = {name: value.to(encoder.device) for name, value in inputs.items()}
    context = (
        torch.autocast(encoder.device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with context:
        features = encoder.model.get_image_features(**inputs)
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return F.normalize(tensor.float(), dim=-1)


def _prompt_vectors(encoder: Encoder, prompts: Sequence[str]) -> np.ndarray:
    """``(N, D)`` frozen text-tower embeddings of ``prompts``, each distinct prompt embedded once."""
    distinct, inverse = np.unique(np.asarray([str(p) for p in prompts], dtype=object), return_inverse=True)
    return encoder.embed_texts([str(p) for p in distinct])[inverse.reshape(-1)]


def _embedded_pairs(encoder: Encoder, pairs: ImagePairs, prompts: np.ndarray | None) -> PairSet:
    """``pairs`` as a ``PairSet`` of the current encoder's (float32) embeddings, for ``holdout_metrics``."""
    x = encoder.embed_images(pairs.images, batch_size=EVAL_BATCH_SIZE)
    return PairSet(
        x=x[:, None, :],
        mask=np.ones((x.shape[0], 1), dtype=bool),
        prompt=prompts,
        a=pairs.a,
        b=pairs.b,
        outcome=pairs.outcome,
        weight=pairs.weight,
    )


def _head_config(config: FinetuneConfig) -> dict[str, Any]:
    """A valid ``BTConfig`` describing the head, so the saved head is an ordinary bt model."""
    return BTConfig(
        epochs=config.epochs,
        min_steps=config.min_steps,
        batch_size=config.batch_size,
        lr=config.head_lr,
        weight_decay=config.weight_decay,
        hidden=0,
        use_prompt=config.use_prompt,
        ties=config.ties,
        both_bad=config.both_bad,
        seed=config.seed,
        device=config.device,
        dtype="float32",
        num_threads=config.num_threads,
        log_every_steps=config.log_every_steps,
    ).to_dict()


# --- The result ------------------------------------------------------------------------------------


class FinetunedRewardModel:
    """A fine-tuned image encoder and its Bradley-Terry head.

    ``encoder`` is a ``rewards.ml.encoders.Encoder`` whose model is the fine-tuned one (LoRA adapters still
    separate until ``merge``); ``head`` is a ``BTRewardModel`` over its normalised embeddings (K=1).
    ``trained_parameters`` names the encoder parameters that were trained (before any merge).
    """

    def __init__(
        self,
        *,
        encoder: Encoder,
        head: BTRewardModel,
        config: FinetuneConfig,
        base: dict[str, Any],
        trained_parameters: list[str],
    ) -> None:
        self.encoder = encoder
        self.head = head
        self.config = config
        self.base = base  # the encoder fine-tuning started from: path, name, fingerprint, family, model_type
        self.trained_parameters = trained_parameters

    @property
    def prompt_conditioned(self) -> bool:
        return self.head.prompt_conditioned

    @property
    def curves(self) -> list[dict[str, Any]]:
        return self.head.curves

    def embed_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> np.ndarray:
        """``(N, D)`` float32 normalised embeddings by the fine-tuned image tower (float32, eval mode)."""
        self.encoder.model.eval()
        return self.encoder.embed_images(images, batch_size=batch_size)

    def score_images(
        self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None, *, batch_size: int = 32
    ) -> np.ndarray:
        """``(N,)`` float32 rewards (higher = better). ``prompts`` (one per image) are needed when the model is
        prompt-conditioned and ignored otherwise."""
        prompt = None
        if self.prompt_conditioned:
            if prompts is None:
                raise ValueError("this reward model is prompt-conditioned: pass one prompt per image")
            if len(prompts) != len(images):
                raise ValueError(f"prompts must have one entry per image ({len(images)}), got {len(prompts)}")
            prompt = _prompt_vectors(self.encoder, prompts)
        x = self.embed_images(images, batch_size=batch_size)
        return self.head.score(x[:, None, :], None, prompt).reward.astype(np.float32)

    def merge(self) -> int:
        """Fold the LoRA adapters into the encoder's weights, in place (a no-op after ``last_layers`` or a
        previous merge); outputs stay the same up to float rounding. Returns how many were merged."""
        return merge_lora(self.encoder.model)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model into ``directory`` (created if needed); merges LoRA adapters first (``merge``).

        - ``encoder/``: the fine-tuned encoder as a plain transformers directory (``config.json``,
          ``model.safetensors``, tokenizer files, ``preprocessor_config.json``), which
          ``rewards.ml.encoders.load_encoder`` (or ``AutoModel.from_pretrained``) loads.
        - ``config.json`` + ``model.safetensors``: the head, an ordinary ``bt`` reward model over that
          encoder's embeddings, which ``rewards.ml.model.load_reward_model`` loads. Its ``extra`` holds
          ``finetune`` (this config), ``encoder`` (``dir``, the saved encoder's ``fingerprint``, and ``base``,
          the encoder fine-tuning started from) and ``trained_parameters``.
        """
        self.merge()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        encoder_dir = path / ENCODER_DIR
        self.encoder.model.save_pretrained(encoder_dir)
        self.encoder.tokenizer.save_pretrained(encoder_dir)
        assert self.encoder.image_processor is not None
        self.encoder.image_processor.save_pretrained(encoder_dir)
        self.head.extra = {
            "finetune": self.config.to_dict(),
            "encoder": {
                "dir": ENCODER_DIR,
                "fingerprint": inspect_encoder(encoder_dir).fingerprint,
                "base": self.base,
            },
            "trained_parameters": self.trained_parameters,
        }
        self.head.save_pretrained(path)


def load_finetuned(directory: str | Path, *, device: str = "cpu") -> FinetunedRewardModel:
    """Load a directory written by ``FinetunedRewardModel.save_pretrained`` onto ``device`` (float32)."""
    path = Path(directory)
    head = load_reward_model(path, device=device)
    if not isinstance(head, BTRewardModel) or "finetune" not in head.extra:
        raise ValueError(f"{path} is a reward model directory but not a fine-tuned one (no extra.finetune)")
    encoder = load_encoder(path / head.extra["encoder"]["dir"], device=device)
    return FinetunedRewardModel(
        encoder=encoder,
        head=head,
        config=FinetuneConfig.from_dict(head.extra["finetune"]),
        base=dict(head.extra["encoder"]["base"]),
        trained_parameters=list(head.extra["trained_parameters"]),
    )
