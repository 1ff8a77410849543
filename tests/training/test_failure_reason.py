"""A job that runs out of memory fails with a reason that names the settings to lower (with their
values), not only the allocator's message; other failures keep their own message. The errors are
the real ones torch raises."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.algorithms import ALGORITHMS
from training.services.jobs import failure_reason

DDPO = {"train_batch_size": 8, "prompts_per_iteration": 4, "images_per_prompt": 8, "resolution": 512,
        "sample_steps": 50, "dtype": "float32", "learning_rate": 3e-4}  # fmt: skip


def test_cuda_out_of_memory_names_the_settings_to_lower() -> None:
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    reason = failure_reason(exc, ALGORITHMS["ddpo"], DDPO)
    assert reason.startswith(
        "out of GPU memory: lower train_batch_size=8, prompts_per_iteration=4, images_per_prompt=8, "
        "resolution=512, sample_steps=50 or use dtype bfloat16 (the settings that set ddpo's peak memory)"
    )
    assert reason.endswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "learning_rate" not in reason


def test_the_cpu_allocator_running_out_is_named_too() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)  # the real allocator's refusal, nothing allocated
    reason = failure_reason(info.value, ALGORITHMS["text_dpo"], {"batch_size": 64, "max_length": 4096})
    assert reason.startswith("out of CPU memory: lower batch_size=64, max_length=4096 (the settings")
    assert "can't allocate memory" in reason


def test_other_failures_keep_their_message() -> None:
    reason = failure_reason(ValueError("the loss is not finite"), ALGORITHMS["ddpo"], DDPO)
    assert reason == "ValueError: the loss is not finite"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_names_memory_settings_that_its_config_has(name: str) -> None:
    algo = ALGORITHMS[name]
    fields = {f.name for f in dataclasses.fields(algo.config_class())}
    assert algo.memory and set(algo.memory) <= fields, set(algo.memory) - fields
