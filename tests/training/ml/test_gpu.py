"""Every trainer in half precision on a CUDA device (``pytest -m gpu`` on the lent GPU machine; the
default run deselects them): finite metrics, the ratio 1 before the first update (sampling and
training in the same precision and batch shapes), LoRA weights that change, checkpoints that load
into plain diffusers / transformers on the GPU."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoModelForCausalLM

from simulate.tiny_models import tiny_sd3_pipeline
from tests.training.ml import test_ddpo as ddpo_tests
from tests.training.ml import test_diffusion_dpo as dpo_tests
from tests.training.ml import test_diffusion_grpo as grpo_tests
from tests.training.ml import test_flow_grpo as flow_tests
from tests.training.ml.test_ddpo import brightness
from tests.training.ml.test_text_dpo import PAIRS as TEXT_PAIRS
from tests.training.ml.test_text_dpo import _config as text_dpo_config
from tests.training.ml.test_text_grpo import PROMPTS as TEXT_PROMPTS
from tests.training.ml.test_text_grpo import _config as text_grpo_config
from tests.training.ml.test_text_grpo import length
from training.ml.ddpo.trainer import train as ddpo
from training.ml.diffusion_dpo.trainer import train as diffusion_dpo
from training.ml.diffusion_grpo.trainer import train as diffusion_grpo
from training.ml.flow_grpo.trainer import train as flow_grpo
from training.ml.text_dpo.trainer import train as text_dpo
from training.ml.text_grpo.trainer import train as text_grpo

pytestmark = pytest.mark.gpu
DTYPES = ["bfloat16", "float16"]
PROMPTS = ["a red square", "a blue circle"]


def _renders_with_the_adapter(checkpoint: Path, base: str, dtype: str) -> None:
    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True, dtype=getattr(torch, dtype))
    pipe.load_lora_weights(str(checkpoint))
    pipe.to("cuda")
    out = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert out.shape[0] == 1 and bool(torch.isfinite(torch.as_tensor(out)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpo(dtype: str, tmp_path: Path) -> None:
    config = ddpo_tests._config(device="cuda", dtype=dtype, iterations=2, checkpoint_every=1)
    result = ddpo(config, PROMPTS, brightness, output_dir=tmp_path)
    assert all(m.first_ratio_error == 0.0 and math.isfinite(m.reward_mean) for m in result.metrics)
    _renders_with_the_adapter(result.checkpoints[-1], config.pipeline, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_grpo(dtype: str, tmp_path: Path) -> None:
    config = grpo_tests._config(device="cuda", dtype=dtype, iterations=2, beta=0.1)
    result = diffusion_grpo(config, PROMPTS, brightness, output_dir=tmp_path)
    first, second = result.metrics
    assert first.first_ratio_error == 0.0 and first.kl == 0.0 and math.isfinite(second.kl)
    _renders_with_the_adapter(result.checkpoints[-1], config.pipeline, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_grpo(dtype: str, tmp_path: Path) -> None:
    pipe = tiny_sd3_pipeline(tmp_path / "sd3", seed=0)
    config = flow_tests._config(pipe, device="cuda", dtype=dtype, iterations=2, beta=0.1)
    result = flow_grpo(config, PROMPTS, brightness, output_dir=tmp_path / "run")
    assert all(m.first_ratio_error == 0.0 and math.isfinite(m.reward_mean) for m in result.metrics)
    _renders_with_the_adapter(result.checkpoints[-1], str(pipe), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_dpo(dtype: str, tmp_path: Path) -> None:
    config = dpo_tests._config(device="cuda", dtype=dtype)
    result = diffusion_dpo(config, dpo_tests.PAIRS, output_dir=tmp_path)
    assert result.metrics[0].loss == pytest.approx(math.log(2), abs=1e-3)
    assert all(math.isfinite(m.loss) for m in result.metrics)
    _renders_with_the_adapter(result.checkpoints[-1], config.pipeline, dtype)


def test_text_grpo_and_dpo_in_bfloat16(tmp_path: Path) -> None:
    grpo = text_grpo(
        text_grpo_config(device="cuda", dtype="bfloat16", lora_rank=4), TEXT_PROMPTS, [length],
        output_dir=tmp_path / "grpo",
    )  # fmt: skip
    dpo = text_dpo(
        text_dpo_config(device="cuda", dtype="bfloat16", lora_rank=4), TEXT_PAIRS, output_dir=tmp_path / "dpo"
    )
    assert all(math.isfinite(m["reward_mean"]) for m in grpo.metrics)
    assert dpo.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)
    for run in ("grpo", "dpo"):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            text_grpo_config().policy, dtype=torch.bfloat16, device_map="cuda"
        )
        model = PeftModel.from_pretrained(base, str(tmp_path / run / "final"))
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]], device="cuda")).logits
        assert bool(torch.isfinite(logits).all())
