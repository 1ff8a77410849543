"""Our ``trl`` preference export feeds TRL as it is: RewardTrainer and DPOTrainer each take one
optimisation step on a tiny offline model, from JSONL and from Parquet. No database needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.ml_helpers import (
    load_preference_file,
    offline_tokenizer,
    prompt_boundary_merges,
    run_dpo_trainer_step,
    run_reward_trainer_step,
)

FORMATS = ("jsonl", "parquet")
# Rows exactly as ``annotate.exports`` writes the ``trl`` schema: the prompt text and the two
# sample texts, nothing added between them.
ROWS = [
    {"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."}
    for i in range(8)
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # ml_helpers sets these before transformers is imported; this also covers a process in which
    # something imported the hub libraries earlier.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_export(directory: Path, fmt: str, rows: list[dict[str, str]]) -> Path:
    path = directory / f"export.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    return path


def test_reward_trainer_takes_one_step_on_the_export(tmp_path: Path) -> None:
    losses = {}
    for fmt in FORMATS:
        work = tmp_path / fmt
        work.mkdir()
        loss, rows = run_reward_trainer_step(write_export(work, fmt, ROWS), fmt, work)
        assert rows == 8
        assert math.isfinite(loss)
        losses[fmt] = loss
    # Same rows, same seed: both files must give the trainer identical batches.
    assert losses["jsonl"] == pytest.approx(losses["parquet"], abs=1e-6)


def test_dpo_trainer_takes_one_step_on_the_export(tmp_path: Path) -> None:
    for fmt in FORMATS:
        work = tmp_path / fmt
        work.mkdir()
        loss, rows = run_dpo_trainer_step(write_export(work, fmt, ROWS), fmt, work)
        assert rows == 8
        # At the first step the policy equals the reference loaded from its directory, so every
        # implicit reward is 0 and the sigmoid DPO loss is exactly log 2.
        assert loss == pytest.approx(math.log(2), abs=1e-4)


def test_trl_joins_prompt_and_completion_without_a_separator(tmp_path: Path) -> None:
    # TRL tokenizes prompt + completion verbatim: a prompt that ends inside a word merges with the
    # completion unless one of the two carries the whitespace.
    rows = [
        {"prompt": "Name the capital of France", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": "Name the capital of France\n", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": "Name the capital of France", "chosen": " Paris", "rejected": " Lyon"},
        {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    ]
    tokenizer = offline_tokenizer()
    mixed = load_preference_file(write_export(tmp_path, "jsonl", rows), "jsonl", tmp_path / "hf")
    assert prompt_boundary_merges(mixed, tokenizer) == [0]
    ours = load_preference_file(write_export(tmp_path, "parquet", ROWS), "parquet", tmp_path / "hf")
    assert prompt_boundary_merges(ours, tokenizer) == []
