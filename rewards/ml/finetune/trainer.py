"""Fine-tune a CLIP/SigLIP image tower together with a linear Bradley-Terry head (see ``FinetuneConfig``).

Top to bottom: the ``last_layers`` alternative to LoRA (``unfreeze_last_layers``; LoRA itself is peft's, see
``common.add_lora``), the data (``ImagePairs``), the trainer (``train``, whose loop is ``common.fit``), and
the result (``FinetunedRewardModel``, ``load_finetuned``, which also loads text models).

A saved model directory (``FinetunedRewardModel.save_pretrained``, the same for text models):

- ``config.json`` + ``model.safetensors``: the head, an ordinary ``bt`` reward model over the fine-tuned
  encoder's normalised embeddings (the temperature already folded into it), which
  ``rewards.ml.model.load_reward_model`` loads. ``extra`` records the run (see ``save_pretrained``).
- ``encoder/``: the fine-tuned encoder, LoRA merged into its weights, as a plain transformers directory
  (``AutoModel.from_pretrained`` or ``rewards.ml.encoders.load_encoder`` loads it).
- ``adapter/`` (LoRA runs): the peft adapter, ``adapter_config.json`` + ``adapter_model.safetensors``, whose
  base model is the encoder fine-tuning started from: ``extra["encoder"]["base"]["path"]``, also written as
  the adapter's ``base_model_name_or_path``. ``PeftModel.from_pretrained(AutoModel.from_pretrained(base),
  "adapter")`` gives the same encoder as ``encoder/``.
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
from peft import PeftModel
from PIL import Image
from torch import nn

from rewards.ml.bt.config import BTConfig
from rewards.ml.data import PairSet
from rewards.ml.encoders import Encoder, EncoderError, inspect_encoder, load_encoder
from rewards.ml.finetune.common import (
    ADAPTER_DIR,
    AUTOCAST,
    ENCODER_DIR,
    Adapter,
    LoopResult,
    add_lora,
    base_info,
    check_pair_arrays,
    fit,
    merged,
    trainable,
)
from rewards.ml.finetune.config import FinetuneConfig
from rewards.ml.heads import pair_targets, resolve_device, torch_threads
from rewards.ml.metrics import holdout_metrics
from rewards.ml.model import BTRewardModel, load_reward_model
from rewards.ml.progress import ConfigError, Progress

EVAL_BATCH_SIZE = 64
VISION_LAYERS = "vision_model.encoder.layers"  # where a CLIP/SigLIP model keeps its vision layers


# --- last_layers ------------------------------------------------------------------------------------


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP/SigLIP model's vision tower, first to last."""
    layers = getattr(getattr(getattr(model, "vision_model", None), "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EncoderError(
            f"{type(model).__name__} has no vision_model.encoder.layers: not a CLIP/SigLIP model"
        )
    return layers


def unfreeze_last_layers(model: nn.Module, n: int) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the last ``n`` vision layers and on everything after them on the way to the
    image embedding (post-layernorm, SigLIP's pooling head, CLIP's visual projection); return those params."""
    layers = vision_layers(model)
    if n > len(layers):
        raise ConfigError("train_layers", f"the encoder has {len(layers)} vision layers, got {n}")
    modules: list[nn.Module] = list(layers)[-n:]
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
    ``weight`` ``(P,)`` float (1.0 for one vote). ``groups`` (``(P,)``, optional) is the comparison each pair
    came from, so the inner validation split keeps a comparison's pairs together.
    """

    images: Sequence[Image.Image]
    prompts: Sequence[str] | None
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    weight: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = len(self.images)
        if self.prompts is not None and len(self.prompts) != s:
            raise ValueError(f"prompts must have one entry per image ({s}), got {len(self.prompts)}")
        check_pair_arrays(self, s, "images")

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
    ``config.dtype`` only sets the autocast dtype). The inner validation split comes out of ``pairs``
    (``FinetuneConfig.val_fraction``); ``holdout`` is only evaluated (float32, like the saved model) at each
    evaluation epoch and reported as ``holdout_*`` metrics, never used to choose anything. A
    ``TrainingCancelled`` raised by ``progress`` propagates unchanged. Raises ``ConfigError`` for a bad
    config (also a layer count the encoder does not have), ``EncoderError`` for an unusable encoder (a text
    encoder included: ``rewards.ml.finetune.text.train`` fine-tunes those) and ``ValueError`` for unusable
    data.
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

        # The same loading path as the frozen-feature kinds; float32 master weights, autocast does the rest.
        encoder = load_encoder(encoder_path, device=config.device, dtype="float32")
        if encoder.image_processor is None:
            raise EncoderError(
                f"{encoder.info.path}: a {encoder.info.family} encoder has no image tower to fine-tune"
            )
        base = base_info(encoder.info)
        model = encoder.model
        model.requires_grad_(False)
        if config.method == "lora":
            model = add_lora(
                model,
                layer_prefix=VISION_LAYERS,
                n_layers=len(vision_layers(model)),
                layers=config.lora_layers,
                targets=config.resolved_lora_targets("image"),
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                layer_kind="vision layers",
            )
            encoder.model = model
        else:
            unfreeze_last_layers(model, config.train_layers)
        trained_names, trained = trainable(model)

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

        def embed_train(index: np.ndarray) -> torch.Tensor:
            return _embed_batch(encoder, [pairs.images[i] for i in index], autocast)

        def embed_eval(index: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat(
                    [
                        _embed_batch(encoder, [pairs.images[i] for i in chunk], None)
                        for chunk in np.array_split(index, max(1, math.ceil(index.size / EVAL_BATCH_SIZE)))
                    ]
                )

        def holdout_figures() -> dict[str, Any]:
            if holdout is None:
                return {}
            return holdout_metrics(head, _embedded_pairs(encoder, holdout, holdout_prompts))

        plain: Any = model.get_base_model() if isinstance(model, PeftModel) else model
        if config.grad_checkpointing:
            plain.activation_checkpointing_enable()
        try:
            loop = fit(
                config=config,
                model=model,
                trained=trained,
                head=head,
                embed_train=embed_train,
                embed_eval=embed_eval,
                prompts=prompts,
                a=pairs.a[keep],
                b=pairs.b[keep],
                target=target[keep],
                weight=weight[keep],
                groups=None if pairs.groups is None else pairs.groups[keep],
                rng=rng,
                device=device,
                holdout_metrics=holdout_figures,
                progress=progress,
            )
        finally:
            if config.grad_checkpointing:
                plain.activation_checkpointing_disable()
                # Enabling it hooked the input embeddings to require grad (for frozen embeddings + LoRA);
                # disabling leaves that hook unless transformers' own peft integration loaded the adapter.
                plain.disable_input_require_grads()
            model.eval()
        head.curves = loop.curves
        head.eval()
        return FinetunedRewardModel(
            encoder=encoder, head=head, config=config, base=base, trained_parameters=trained_names, loop=loop
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
        text_input=config.text_input,
        ties=config.ties,
        both_bad=config.both_bad,
        seed=config.seed,
        device=config.device,
        dtype="float32",
        num_threads=config.num_threads,
        log_every_steps=config.log_every_steps,
    ).to_dict()


# --- The result ------------------------------------------------------------------------------------


def loop_extra(loop: LoopResult | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The loop's figures as saved in ``extra`` (``temperature``, ``inner_split``), or what a loaded model
    recorded (``extra``) when there is no loop."""
    if loop is None:
        return {key: extra[key] for key in ("temperature", "inner_split") if key in extra}
    return {
        "temperature": loop.temperature,
        "inner_split": {
            "train_pairs": loop.train_pairs,
            "val_pairs": loop.val_pairs,
            "best_step": loop.best_step,
            "steps": loop.steps,
            "stopped_early": loop.stopped_early,
            "val_loss": loop.val_loss,
            "val_accuracy": loop.val_accuracy,
        },
    }


def save_finetuned(
    directory: str | Path,
    *,
    model: nn.Module,
    adapter: Adapter | None,
    tokenizer: Any,
    image_processor: Any,
    head: BTRewardModel,
    extra: dict[str, Any],
    sentence_max_length: int | None = None,
) -> None:
    """Write ``encoder/`` (``model``, merged, + tokenizer + image processor), ``adapter/`` when there is one,
    and the head with ``extra`` plus the encoder's and adapter's records. ``sentence_max_length`` writes the
    ``sentence_bert_config.json`` that makes ``rewards.ml.encoders`` truncate texts where training did."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    encoder_dir = path / ENCODER_DIR
    model.save_pretrained(encoder_dir)  # type: ignore[operator]
    tokenizer.save_pretrained(encoder_dir)
    if image_processor is not None:
        image_processor.save_pretrained(encoder_dir)
    if sentence_max_length is not None:
        (encoder_dir / "sentence_bert_config.json").write_text(
            f'{{"max_seq_length": {sentence_max_length}, "do_lower_case": false}}\n'
        )
    if adapter is not None:
        adapter.save(path / ADAPTER_DIR)
    head.extra = {
        **extra,
        "encoder": {
            **extra["encoder"],
            "dir": ENCODER_DIR,
            "fingerprint": inspect_encoder(encoder_dir).fingerprint,
        },
        "adapter": None
        if adapter is None
        else {"dir": ADAPTER_DIR, "base_model_name_or_path": adapter.config.base_model_name_or_path},
    }
    head.save_pretrained(path)


class FinetunedRewardModel:
    """A fine-tuned image encoder and its Bradley-Terry head.

    ``encoder`` is a ``rewards.ml.encoders.Encoder`` whose model is the fine-tuned one (a peft ``PeftModel``
    after LoRA until ``merge``); ``head`` is a ``BTRewardModel`` over its normalised embeddings (K=1), the
    temperature already folded in. ``trained_parameters`` names the encoder parameters that were trained.
    ``temperature`` is the one fitted on the inner split (1.0 without one).
    """

    def __init__(
        self,
        *,
        encoder: Encoder,
        head: BTRewardModel,
        config: FinetuneConfig,
        base: dict[str, Any],
        trained_parameters: list[str],
        loop: LoopResult | None = None,
    ) -> None:
        self.encoder = encoder
        self.head = head
        self.config = config
        self.base = base  # the encoder fine-tuning started from: path, name, fingerprint, family, model_type
        self.trained_parameters = trained_parameters
        self.record = loop_extra(loop, head.extra)
        self.adapter: Adapter | None = None

    @property
    def temperature(self) -> float:
        return float(self.record.get("temperature", 1.0))

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

    def merge(self) -> bool:
        """Fold the LoRA adapters into the encoder's weights, in place, keeping the adapter for
        ``save_pretrained`` (a no-op after ``last_layers`` or a previous merge); outputs stay the same up to
        float rounding. Returns whether there was anything to merge."""
        model, adapter = merged(self.encoder.model)
        self.encoder.model = model
        if adapter is not None:
            self.adapter = adapter
        return adapter is not None

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model into ``directory`` (created if needed; the layout is in the module docstring);
        merges LoRA adapters first (``merge``).

        The head's ``extra`` holds ``finetune`` (this config), ``encoder`` (``dir``, the saved encoder's
        ``fingerprint``, and ``base``, the encoder fine-tuning started from), ``adapter`` (``dir`` and
        ``base_model_name_or_path``, or None after ``last_layers``), ``modality`` ("image"),
        ``trained_parameters``, ``temperature`` and ``inner_split`` (its sizes, the kept step, whether it
        stopped early, its loss and accuracy).
        """
        self.merge()
        assert self.encoder.image_processor is not None
        save_finetuned(
            directory,
            model=self.encoder.model,
            adapter=self.adapter,
            tokenizer=self.encoder.tokenizer,
            image_processor=self.encoder.image_processor,
            head=self.head,
            extra={
                "finetune": self.config.to_dict(),
                "modality": "image",
                "encoder": {"base": self.base},
                "trained_parameters": self.trained_parameters,
                **self.record,
            },
        )


def load_finetuned(directory: str | Path, *, device: str = "cpu") -> Any:
    """Load a directory written by ``save_pretrained`` of a fine-tuned image or text model onto ``device``
    (float32): a ``FinetunedRewardModel`` or a ``rewards.ml.finetune.text.FinetunedTextRewardModel``. The
    merged ``encoder/`` is what loads (no peft needed)."""
    path = Path(directory)
    head = load_reward_model(path, device=device)
    if not isinstance(head, BTRewardModel) or "finetune" not in head.extra:
        raise ValueError(f"{path} is a reward model directory but not a fine-tuned one (no extra.finetune)")
    encoder = load_encoder(path / head.extra["encoder"]["dir"], device=device)
    common: dict[str, Any] = {
        "encoder": encoder,
        "head": head,
        "config": FinetuneConfig.from_dict(head.extra["finetune"]),
        "base": dict(head.extra["encoder"]["base"]),
        "trained_parameters": list(head.extra["trained_parameters"]),
    }
    if head.extra.get("modality") == "text":
        from rewards.ml.finetune.text import FinetunedTextRewardModel

        return FinetunedTextRewardModel(**common)
    return FinetunedRewardModel(**common)
