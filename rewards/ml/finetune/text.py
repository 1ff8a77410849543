"""Fine-tune a sentence encoder (BERT family: MiniLM, MPNet, ...) together with a linear Bradley-Terry head.

The text counterpart of ``trainer.py``: peft LoRA on the encoder's layers, mean pooling over the attention
mask and L2 normalisation (as ``rewards.ml.encoders`` embeds texts), a linear head trained with the same
likelihood as ``bt``, the inner validation split, early stopping and temperature of ``common.fit``. What the
encoder reads is ``FinetuneConfig.text_input``: the response alone, or prompt and response as one text pair
(cross-encoder style). Top to bottom: tokenisation (``TextInputs``), the data (``TextPairs``), the trainer
(``train``) and the result (``FinetunedTextRewardModel``; ``trainer.load_finetuned`` loads it back). The
saved directory has the layout described in ``trainer.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewards.ml.data import PairSet
from rewards.ml.encoders import Encoder, EncoderError, load_encoder
from rewards.ml.finetune.common import (
    AUTOCAST,
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
from rewards.ml.finetune.trainer import _head_config, loop_extra, save_finetuned
from rewards.ml.heads import pair_targets, resolve_device, torch_threads
from rewards.ml.metrics import holdout_metrics
from rewards.ml.model import BTRewardModel
from rewards.ml.progress import ConfigError, Progress

EVAL_BATCH_SIZE = 64
TEXT_LAYERS = "encoder.layer"  # where BERT-style models (BERT, RoBERTa, MPNet, ...) keep their layers
# Text-pair templates: BERT-style ``[CLS] A [SEP] B [SEP]``; RoBERTa-style ``<s> A </s></s> B </s>``.
DOUBLE_SEP = ("roberta", "xlm-roberta", "mpnet")


# --- Tokenisation ----------------------------------------------------------------------------------


class TextInputs:
    """Token ids of S samples, built once, as the encoder will read them.

        ``text_input="response"``: ``[CLS] response [SEP]``, truncated to ``max_length`` (exactly what
        ``tokenizer(response, truncation=True, max_length=max_length)`` gives). ``"joint"``: the text pair
        ``[CLS] prompt [SEP] response [SEP]`` (token type 0 for the prompt part, 1 for the response part, when the
        model uses token types), exactly what ``tokenizer(prompt, response)`` gives when it fits, except that an empty
    response keeps its empty segment (``[CLS] prompt [SEP] [SEP]``; the tokenizer drops it, and "said nothing" would
    read as the prompt alone). When it does not fit,
        the response is kept whole if it fits on its own (else its first tokens) and the prompt gives up its
        BEGINNING: a conversation's last turns are what the response answers.
    """

    def __init__(
        self,
        tokenizer: Any,
        model_type: str,
        texts: Sequence[str],
        prompts: Sequence[str] | None,
        *,
        text_input: str,
        max_length: int,
    ) -> None:
        if text_input == "joint" and prompts is None:
            raise ValueError("text_input='joint' encodes each response with its prompt: pass the prompts")
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.types = "token_type_ids" in tokenizer.model_input_names
        cls, sep = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id)
        middle = [sep, sep] if model_type in DOUBLE_SEP else [sep]
        responses = _token_ids(tokenizer, texts)
        self.ids: list[list[int]] = []
        self.type_ids: list[list[int]] = []
        if text_input == "response":
            for r in responses:
                ids = [cls, *r[: max_length - 2], sep]
                self.ids.append(ids)
                self.type_ids.append([0] * len(ids))
            return
        assert prompts is not None
        budget = max_length - 2 - len(middle)
        for p, r in zip(_token_ids(tokenizer, prompts), responses, strict=True):
            r = r[:budget]
            room = budget - len(r)
            p = p[len(p) - room :] if room > 0 else []
            first = [cls, *p, *middle]
            self.ids.append([*first, *r, sep])
            # RoBERTa-style models have a single token type: all zeros.
            second = 1 if model_type not in DOUBLE_SEP else 0
            self.type_ids.append([0] * len(first) + [second] * (len(r) + 1))

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self, index: np.ndarray) -> np.ndarray:
        return np.array([len(self.ids[i]) for i in index], dtype=np.int64)

    def batch(self, index: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The samples at ``index`` padded to the longest of them: ``input_ids``, ``attention_mask`` (and
        ``token_type_ids`` for models that take them) on ``device``."""
        width = max(len(self.ids[i]) for i in index)
        ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        types = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            n = len(self.ids[i])
            ids[row, :n] = torch.as_tensor(self.ids[i])
            mask[row, :n] = 1
            types[row, :n] = torch.as_tensor(self.type_ids[i])
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.types:
            out["token_type_ids"] = types.to(device)
        return out


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens, each distinct text tokenised once (prompts repeat a lot)."""
    distinct, inverse = np.unique(np.asarray([str(t) for t in texts], dtype=object), return_inverse=True)
    ids = (
        tokenizer([str(t) for t in distinct], add_special_tokens=False)["input_ids"] if len(distinct) else []
    )
    return [list(ids[i]) for i in inverse.reshape(-1)]


def embed(model: nn.Module, inputs: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """``(N, D)`` float32 L2-normalised mean-pooled embeddings (mean over real tokens, as
    ``rewards.ml.encoders.Encoder.embed_texts`` does), with gradients when enabled."""
    context = (
        torch.autocast(inputs["input_ids"].device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with context:
        hidden = model(**inputs).last_hidden_state
    # Sum in float32: a float16 sum over hundreds of tokens can overflow.
    hidden = hidden.float()
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def embed_all(
    model: nn.Module, inputs: TextInputs, index: np.ndarray, device: torch.device, *, batch_size: int
) -> torch.Tensor:
    """Eval-mode, no-grad float32 embeddings ``(len(index), D)`` of the samples at ``index``, in batches of
    similar length (less padding), returned in ``index`` order."""
    order = np.argsort(inputs.lengths(index), kind="stable")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = index[order[start : start + batch_size]]
            chunks.append(embed(model, inputs.batch(chunk.tolist(), device), None))
    if not chunks:
        return torch.zeros((0, 0), device=device)
    out = torch.empty((len(index), chunks[0].shape[1]), device=device)
    out[torch.as_tensor(order, device=device)] = torch.cat(chunks)
    return out


# --- Data ------------------------------------------------------------------------------------------


@dataclass
class TextPairs:
    """S text samples and P judged pairs over them: a ``PairSet`` with the texts instead of cached features.

    ``texts`` holds each sample's response, ``prompts`` its prompt (None: no prompts, only
    ``text_input="response"`` then). ``a``/``b`` are ``(P,)`` indices into ``texts``, ``outcome`` the
    ``(P,)`` codes of ``rewards.ml.data`` (A_WINS, B_WINS, TIE, ...), ``weight`` ``(P,)`` float (1.0 for one
    vote), ``groups`` (``(P,)``, optional) the comparison each pair came from, so the inner validation split
    keeps a comparison's pairs together.
    """

    texts: Sequence[str]
    prompts: Sequence[str] | None
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray
    weight: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = len(self.texts)
        if self.prompts is not None and len(self.prompts) != s:
            raise ValueError(f"prompts must have one entry per text ({s}), got {len(self.prompts)}")
        check_pair_arrays(self, s, "texts")

    @property
    def num_pairs(self) -> int:
        return int(self.a.shape[0])


# --- Training --------------------------------------------------------------------------------------


def text_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-style sentence encoder, first to last."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise EncoderError(
            f"{type(model).__name__} has no encoder.layer: LoRA fine-tuning of text needs a BERT-style encoder"
        )
    return layers


def load_text_encoder(path: str | Path, config: FinetuneConfig) -> Encoder:
    """``load_encoder`` (float32 on the config's device) plus the checks a text fine-tuning run needs."""
    encoder = load_encoder(path, device=config.device, dtype="float32")
    if encoder.info.family != "text":
        raise EncoderError(
            f"{encoder.info.path}: a {encoder.info.family} encoder is fine-tuned on images "
            "(rewards.ml.finetune.trainer.train), not as a sentence encoder"
        )
    if config.method != "lora":
        raise ConfigError("method", f"{config.method!r} is for image towers; sentence encoders use 'lora'")
    if config.max_length > encoder.max_length:
        raise ConfigError(
            "max_length", f"the encoder reads at most {encoder.max_length} tokens, got {config.max_length}"
        )
    return encoder


def train(
    config: FinetuneConfig,
    pairs: TextPairs,
    *,
    encoder_path: str | Path,
    holdout: TextPairs | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> FinetunedTextRewardModel:
    """Fine-tune the sentence encoder at ``encoder_path`` (LoRA) and a linear bt head on ``pairs``.

    The inner validation split comes out of ``pairs`` (``val_fraction``); ``holdout`` is only evaluated and
    reported (``holdout_*`` metrics) at evaluation epochs, never used to choose anything. A
    ``TrainingCancelled`` raised by ``progress`` propagates unchanged. Raises ``ConfigError`` for a bad config
    (``last_layers``, image LoRA targets, a layer count or ``max_length`` the encoder does not have),
    ``EncoderError`` for an unusable encoder (an image encoder included) and ``ValueError`` for unusable data.
    """
    config.validate()
    device = resolve_device(config.device)
    autocast = AUTOCAST[config.dtype]
    targets = config.resolved_lora_targets("text")
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)

        target, weight = pair_targets(pairs.outcome, pairs.weight, ties=config.ties, both_bad=config.both_bad)
        keep = np.flatnonzero(weight > 0)
        if not keep.size:
            raise ValueError("no pairs to train on: every pair is missing, dropped both-bad or a dropped tie")

        encoder = load_text_encoder(encoder_path, config)
        base = base_info(encoder.info)
        inputs = TextInputs(
            encoder.tokenizer,
            encoder.info.model_type,
            pairs.texts,
            pairs.prompts,
            text_input=config.text_input,
            max_length=config.max_length,
        )
        model = add_lora(
            encoder.model,
            layer_prefix=TEXT_LAYERS,
            n_layers=len(text_layers(encoder.model)),
            layers=config.lora_layers,
            targets=targets,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
        )
        encoder.model = model
        trained_names, trained = trainable(model)
        head = BTRewardModel(config=_head_config(config), dim=encoder.info.dim, k=1, prompt_conditioned=False)
        head.to(device)

        def embed_train(index: np.ndarray) -> torch.Tensor:
            return embed(model, inputs.batch(index.tolist(), device), autocast)

        def embed_eval(index: np.ndarray) -> torch.Tensor:
            return embed_all(model, inputs, index, device, batch_size=EVAL_BATCH_SIZE)

        holdout_inputs = None
        if holdout is not None:
            holdout_inputs = TextInputs(
                encoder.tokenizer,
                encoder.info.model_type,
                holdout.texts,
                holdout.prompts,
                text_input=config.text_input,
                max_length=config.max_length,
            )

        def holdout_figures() -> dict[str, Any]:
            if holdout is None or holdout_inputs is None:
                return {}
            return holdout_metrics(head, _embedded_pairs(model, holdout_inputs, holdout, device))

        plain: Any = model.get_base_model()
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
                prompts=None,
                a=pairs.a[keep],
                b=pairs.b[keep],
                target=target[keep],
                weight=weight[keep],
                groups=None if pairs.groups is None else pairs.groups[keep],
                rng=rng,
                device=device,
                holdout_metrics=holdout_figures if holdout is not None else None,
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
        return FinetunedTextRewardModel(
            encoder=encoder, head=head, config=config, base=base, trained_parameters=trained_names, loop=loop
        )


def _embedded_pairs(model: nn.Module, inputs: TextInputs, pairs: TextPairs, device: torch.device) -> PairSet:
    """``pairs`` as a ``PairSet`` of the current encoder's float32 embeddings, for ``holdout_metrics``."""
    x = embed_all(model, inputs, np.arange(len(inputs)), device, batch_size=EVAL_BATCH_SIZE).cpu().numpy()
    return PairSet(
        x=x[:, None, :],
        mask=np.ones((x.shape[0], 1), dtype=bool),
        prompt=None,
        a=pairs.a,
        b=pairs.b,
        outcome=pairs.outcome,
        weight=pairs.weight,
    )


# --- The result ------------------------------------------------------------------------------------


class FinetunedTextRewardModel:
    """A fine-tuned sentence encoder and its linear Bradley-Terry head.

    ``encoder`` is a ``rewards.ml.encoders.Encoder`` whose model is the fine-tuned one (a peft ``PeftModel``
    until ``merge``); ``head`` a ``BTRewardModel`` (K=1, not prompt-conditioned: with ``text_input="joint"``
    the prompt is in the encoder's input) over its normalised embeddings, the temperature folded in.
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
        self.base = base
        self.trained_parameters = trained_parameters
        self.record = loop_extra(loop, head.extra)
        self.adapter: Adapter | None = None

    @property
    def temperature(self) -> float:
        return float(self.record.get("temperature", 1.0))

    @property
    def text_input(self) -> str:
        return self.config.text_input

    @property
    def curves(self) -> list[dict[str, Any]]:
        return self.head.curves

    def inputs(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> TextInputs:
        """The token ids the encoder reads for these samples (see ``TextInputs``)."""
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"prompts must have one entry per text ({len(texts)}), got {len(prompts)}")
        return TextInputs(
            self.encoder.tokenizer,
            self.encoder.info.model_type,
            texts,
            prompts,
            text_input=self.config.text_input,
            max_length=self.config.max_length,
        )

    def embed_texts(
        self, texts: Sequence[str], prompts: Sequence[str] | None = None, *, batch_size: int = EVAL_BATCH_SIZE
    ) -> np.ndarray:
        """``(N, D)`` float32 normalised embeddings by the fine-tuned encoder (eval mode). ``prompts`` (one
        per text) are needed with ``text_input="joint"`` and ignored otherwise."""
        inputs = self.inputs(texts, prompts if self.config.text_input == "joint" else None)
        self.encoder.model.eval()
        index = np.arange(len(inputs))
        return (
            embed_all(self.encoder.model, inputs, index, self.encoder.device, batch_size=batch_size)
            .cpu()
            .numpy()
        )

    def score_texts(
        self, texts: Sequence[str], prompts: Sequence[str] | None = None, *, batch_size: int = EVAL_BATCH_SIZE
    ) -> np.ndarray:
        """``(N,)`` float32 rewards (higher = better), calibrated (the temperature is in the head)."""
        if not len(texts):
            return np.zeros(0, dtype=np.float32)
        x = self.embed_texts(texts, prompts, batch_size=batch_size)
        return self.head.score(x[:, None, :], None, None).reward.astype(np.float32)

    def pair_set(self, pairs: TextPairs) -> PairSet:
        """``pairs`` as a ``PairSet`` of this model's embeddings, for ``rewards.ml.metrics.evaluate``."""
        x = self.embed_texts(pairs.texts, pairs.prompts)
        return PairSet(
            x=x[:, None, :],
            mask=np.ones((x.shape[0], 1), dtype=bool),
            prompt=None,
            a=pairs.a,
            b=pairs.b,
            outcome=pairs.outcome,
            weight=pairs.weight,
        )

    def merge(self) -> bool:
        """Fold the LoRA adapters into the encoder's weights, in place, keeping the adapter for
        ``save_pretrained``; returns whether there was anything to merge."""
        model, adapter = merged(self.encoder.model)
        self.encoder.model = model
        if adapter is not None:
            self.adapter = adapter
        return adapter is not None

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model into ``directory`` (the layout of ``trainer.py``'s docstring): the head, the merged
        encoder in ``encoder/`` (with a ``sentence_bert_config.json`` saying ``max_length``, so
        ``rewards.ml.encoders`` truncates response-only texts as training did) and the peft adapter in
        ``adapter/``. ``extra`` as for images, with ``modality="text"`` and ``text_input``."""
        self.merge()
        save_finetuned(
            directory,
            model=self.encoder.model,
            adapter=self.adapter,
            tokenizer=self.encoder.tokenizer,
            image_processor=None,
            head=self.head,
            extra={
                "finetune": self.config.to_dict(),
                "modality": "text",
                "text_input": self.config.text_input,
                "max_length": self.config.max_length,
                "encoder": {"base": self.base},
                "trained_parameters": self.trained_parameters,
                **self.record,
            },
            sentence_max_length=self.config.max_length,
        )
