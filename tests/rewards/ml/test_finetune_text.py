"""Text fine-tuning at the ML level (no Django): what the encoder reads for a sample, that a LoRA
run on a tiny random BERT learns an easy preference, and that what it saves loads back, with
plain peft for the adapter, scoring the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

from rewards.ml.data import A_WINS
from rewards.ml.finetune.config import FinetuneConfig
from rewards.ml.finetune.text import TextInputs, TextPairs, train
from rewards.ml.finetune.trainer import load_finetuned
from tests.rewards.ml.tiny_models import save_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_inputs_are_what_the_tokenizer_gives(bert: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(bert))
    prompts = ["How do I boil an egg?", "Say nothing."]
    texts = ["Put it in boiling water for nine minutes.", ""]
    joint = TextInputs(tok, "bert", texts, prompts, text_input="joint", max_length=64)
    response = TextInputs(tok, "bert", texts, None, text_input="response", max_length=64)
    pair = tok(prompts[0], texts[0])
    assert joint.ids[0] == pair["input_ids"]
    assert joint.type_ids[0] == pair["token_type_ids"]
    for i, t in enumerate(texts):
        assert response.ids[i] == tok(t, truncation=True, max_length=64)["input_ids"]
    # An empty response keeps its (empty) segment: the tokenizer would drop it, and the encoder
    # could not tell "said nothing" from the prompt alone.
    alone = tok(prompts[1])["input_ids"]
    assert joint.ids[1] == [*alone, tok.sep_token_id]
    assert joint.type_ids[1] == [0] * len(alone) + [1]


def test_a_long_prompt_gives_up_its_beginning_and_the_response_stays_whole(bert: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(bert))
    prompt = " ".join(f"turn{i}" for i in range(200)) + " final question"
    text = "the answer"
    joint = TextInputs(tok, "bert", [text], [prompt], text_input="joint", max_length=32)
    ids = joint.ids[0]
    assert len(ids) == 32
    decoded = str(tok.decode(ids, skip_special_tokens=True))
    assert decoded.endswith("final question the answer")
    assert "turn0 " not in decoded


def _pairs(rng: np.random.Generator, n: int) -> TextPairs:
    """Good answers beat bad ones: the words differ, so a linear head on any encoder can learn it."""
    texts, a, b = [], [], []
    for i in range(n):
        good = f"great helpful answer {rng.integers(100)}"
        bad = f"awful rude reply {rng.integers(100)}"
        flip = rng.random() < 0.5
        texts += [bad, good] if flip else [good, bad]
        a.append(2 * i + (1 if flip else 0))
        b.append(2 * i + (0 if flip else 1))
    return TextPairs(
        texts=texts,
        prompts=[f"question {i // 2}" for i in range(2 * n)],
        a=np.array(a),
        b=np.array(b),
        outcome=np.full(n, A_WINS),
        weight=np.ones(n, dtype=np.float32),
    )


@pytest.mark.parametrize("text_input", ["response", "joint"])
def test_lora_learns_an_easy_preference_and_loads_back(bert: Path, tmp_path: Path, text_input: str) -> None:
    rng = np.random.default_rng(0)
    pairs, holdout = _pairs(rng, 96), _pairs(rng, 40)
    config = FinetuneConfig(
        text_input=text_input,
        epochs=6,
        batch_size=16,
        lr=1e-3,
        head_lr=1e-2,
        max_length=32,
        num_threads=1,
        device="cpu",
    )
    seen: list[object] = []
    model = train(config, pairs, encoder_path=bert, holdout=holdout, progress=seen.append)
    assert seen
    scores = model.score_texts(list(holdout.texts), list(holdout.prompts or []))
    accuracy = float(np.mean(scores[holdout.a] > scores[holdout.b]))
    assert accuracy >= 0.9, accuracy
    assert all("lora_" in name for name in model.trained_parameters)

    model.save_pretrained(tmp_path / "ft")
    back = load_finetuned(tmp_path / "ft")
    np.testing.assert_allclose(
        back.score_texts(list(holdout.texts), list(holdout.prompts or [])), scores, rtol=1e-4, atol=1e-5
    )
    # The adapter is a plain peft adapter over the base encoder.
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(bert)), str(tmp_path / "ft" / "adapter")
    )
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora
    assert any(torch.count_nonzero(p) for n, p in peft_model.named_parameters() if "lora_B" in n)
