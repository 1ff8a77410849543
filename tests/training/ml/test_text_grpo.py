"""Text GRPO through TRL's GRPOTrainer on a tiny random GPT-2 (saved with save_pretrained, loaded
by TRL from the directory): real optimizer steps with a plain callable reward, a LoRA adapter
that loads with plain peft, refusals, and a toy problem with a known reward that must rise."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from simulate.tiny_models import tiny_causal_lm
from training.ml.configs import ConfigError
from training.ml.text_grpo.config import TextGRPOConfig
from training.ml.text_grpo.trainer import train

PROMPTS = ["say something", "tell me a story", "what is it", "hello there"]


@cache
def _policy(letters: bool = False) -> Path:
    return tiny_causal_lm(Path(tempfile.mkdtemp(prefix="tiny-lm-")) / "lm", letters=letters)


def _config(**kw: Any) -> TextGRPOConfig:
    base: dict[str, Any] = {
        "policy": str(_policy()),
        "steps": 2,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
    }
    base.update(kw)
    return TextGRPOConfig.from_dict(base)


def length(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def test_two_steps_change_the_weights_and_the_policy_loads_back(tmp_path: Path) -> None:
    seen: list[dict[str, float]] = []
    result = train(_config(), PROMPTS, [length], output_dir=tmp_path, progress=seen.append)
    assert [m["step"] for m in result.metrics] == [1.0, 2.0] and seen == result.metrics
    assert all({"reward_mean", "reward_std", "zero_spread_groups"} <= m.keys() for m in result.metrics)
    before = load_file(str(_policy() / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), local_files_only=True)
    assert model.config.n_embd == 32


def test_a_lora_run_saves_an_adapter_that_plain_peft_loads(tmp_path: Path) -> None:
    train(_config(lora_rank=4, lora_alpha=8), PROMPTS, [length], output_dir=tmp_path)
    base = AutoModelForCausalLM.from_pretrained(str(_policy()), local_files_only=True)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    ids = torch.tensor([[2, 100, 200, 300]])
    with torch.no_grad():
        a = tuned(ids).logits
        with tuned.disable_adapter():
            b = tuned(ids).logits
    assert not torch.allclose(a, b)


def test_a_run_continues_a_previous_runs_adapter(tmp_path: Path) -> None:
    """The loop's next round starts from the last good round's adapter (``init_lora``): the run
    begins where that one ended, and saves the whole adapter again; another rank is refused."""
    first = tmp_path / "first"
    train(_config(lora_rank=4, lora_alpha=8, steps=1), PROMPTS, [length], output_dir=first)
    adapter = first / "final"
    seen: list[dict[str, float]] = []
    second = tmp_path / "second"
    train(
        _config(lora_rank=4, lora_alpha=8, steps=1, learning_rate=1e-9, init_lora=str(adapter)),
        PROMPTS, [length], output_dir=second, progress=seen.append,
    )  # fmt: skip
    a = load_file(str(adapter / "adapter_model.safetensors"))
    b = load_file(str(second / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    # A learning rate of 1e-9: the second run's adapter is the first's, not a fresh one (whose B
    # matrices would be zero).
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    assert [m["step"] for m in seen] == [1.0]
    with pytest.raises(ValueError, match="the adapter has lora_rank 4, the config 8"):
        train(_config(lora_rank=8, init_lora=str(adapter)), PROMPTS, [length], output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="is not a peft adapter"):
        train(_config(lora_rank=4, init_lora=str(tmp_path)), PROMPTS, [length], output_dir=tmp_path / "y")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"init_lora": "/somewhere"}, "init_lora: continuing an adapter needs lora_rank > 0"),
        ({"num_generations": 1}, "num_generations"),
        ({"learning_rate": 0.5}, "learning_rate"),
        ({"lora_rank": -1}, "lora_rank"),
        ({"steps": 1.5}, "steps: expected int"),
        ({"device": "tpu"}, "device"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_settings_are_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**change)


def test_a_missing_policy_or_a_broken_reward_fails_readably(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        train(_config(policy=str(tmp_path)), PROMPTS, [length], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="NaN"):
        train(
            _config(),
            PROMPTS,
            [lambda prompts, completions, **_: [float("nan")] * len(completions)],
            output_dir=tmp_path / "o2",
        )
    with pytest.raises(ValueError, match="values for"):
        train(_config(), PROMPTS, [lambda prompts, completions, **_: [1.0]], output_dir=tmp_path / "o3")


def share_of_a(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    return [c.count("a") / max(1, len(c.replace(" ", ""))) for c in completions]


def test_text_grpo_learns_a_known_reward(tmp_path: Path) -> None:
    """A 67-token letter vocabulary; the reward is the share of the letter a in the completion."""
    config = _config(
        policy=str(_policy(letters=True)), steps=30, prompts_per_step=2, num_generations=8,
        max_completion_length=8, learning_rate=1e-2,
    )  # fmt: skip
    result = train(config, ["a b c", "x y z", "hello", "go"], [share_of_a], output_dir=tmp_path)
    rewards = [m["reward_mean"] for m in result.metrics]
    assert len(rewards) == 30
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3, rewards  # here: 0.04 -> 0.71


def test_text_rloo_takes_real_steps_and_learns_a_known_reward(tmp_path: Path) -> None:
    """TRL's RLOOTrainer through the same path: the letter-share reward rises."""
    from training.ml.text_rloo.config import TextRLOOConfig
    from training.ml.text_rloo.trainer import train as train_rloo

    config = TextRLOOConfig.from_dict(
        {
            "policy": str(_policy(letters=True)), "steps": 30, "prompts_per_step": 2, "num_generations": 8,
            "max_completion_length": 8, "learning_rate": 1e-2,
        }
    )  # fmt: skip
    result = train_rloo(config, ["a b c", "x y z", "hello", "go"], [share_of_a], output_dir=tmp_path)
    rewards = [m["reward_mean"] for m in result.metrics]
    assert len(rewards) == 30
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3, rewards
    assert (tmp_path / "final" / "model.safetensors").is_file()
