"""Text DPO through TRL's DPOTrainer on a tiny random GPT-2 (saved with save_pretrained, loaded by
TRL from the directory): real optimizer steps whose implicit reward margin grows on the judged
pairs, a LoRA adapter that loads with plain peft, resume from a checkpoint, refusals."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.ml.test_text_grpo import _policy
from training.ml.configs import ConfigError
from training.ml.text_dpo.config import TextDPOConfig
from training.ml.text_dpo.trainer import train

# People preferred the polite answer each time.
PAIRS = [
    (f"question {i}", "thank you, here is a kind answer", "no. go away")
    for i in range(8)
]  # fmt: skip


def _config(**kw: Any) -> TextDPOConfig:
    base: dict[str, Any] = {"policy": str(_policy()), "steps": 2, "batch_size": 4, "learning_rate": 1e-3,
                            "max_length": 64}  # fmt: skip
    return TextDPOConfig.from_dict({**base, **kw})


def _margin(model_dir: Path) -> float:
    """log p(chosen) - log p(rejected) under a policy, summed over the response tokens."""
    tok = AutoTokenizer.from_pretrained(str(_policy()))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    prompt, chosen, rejected = PAIRS[0]

    def logp(response: str) -> float:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + tok(response, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits.log_softmax(-1)
        targets = ids[0, len(p) :]
        return float(logits[0, len(p) - 1 : -1].gather(1, targets[:, None]).sum())

    return logp(chosen) - logp(rejected)


def test_steps_raise_the_preferred_answer_and_the_policy_loads_back(tmp_path: Path) -> None:
    seen: list[dict[str, float]] = []
    result = train(_config(steps=12), PAIRS, output_dir=tmp_path, progress=seen.append)
    assert [m["step"] for m in result.metrics] == [float(i) for i in range(1, 13)] and seen == result.metrics
    first, last = result.metrics[0], result.metrics[-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)
    assert last["margin"] > 0 and last["loss"] < first["loss"] and last["implicit_accuracy"] == 1.0
    assert _margin(tmp_path / "final") > _margin(_policy()) + 1.0


def test_a_lora_adapter_loads_with_plain_peft_and_the_base_is_untouched(tmp_path: Path) -> None:
    train(_config(lora_rank=4, lora_alpha=8), PAIRS, output_dir=tmp_path)
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(_policy()))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.equal(tuned, plain)  # the adapter learned something
    assert all(
        torch.equal(before[k], v)
        for k, v in load_file(str(_policy() / "model.safetensors")).items()
        if k in before
    )


def test_resume_continues_from_a_checkpoint(tmp_path: Path) -> None:
    full = train(_config(steps=3, checkpoint_every=1), PAIRS, output_dir=tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-2").is_dir()
    resumed = train(
        _config(steps=3, checkpoint_every=1), PAIRS, output_dir=tmp_path / "full",
        resume_from=tmp_path / "full" / "checkpoint-2",
    )  # fmt: skip
    assert [m["step"] for m in resumed.metrics] == [3.0]  # only the step after the checkpoint ran
    assert resumed.metrics[0]["loss"] == pytest.approx(full.metrics[2]["loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"beta": 0.0}, "beta must be in"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"policy": ""}, "policy: the local directory"),
        ({"dtype": "float16"}, "float16 needs a GPU"),
        ({"nonsense": 1}, "unknown"),
    ],
)
def test_refusals(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**kw)


def test_no_pairs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no judged pairs"):
        train(_config(), [], output_dir=tmp_path)
