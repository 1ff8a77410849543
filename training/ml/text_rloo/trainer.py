"""Text RLOO: TRL's ``RLOOTrainer`` with our reward callables (see ``text_grpo/trainer.py``, whose
``run_online`` maps the config onto TRL's and reports TRL's per-step logs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from training.ml.text_grpo.trainer import TextGRPOResult, run_online
from training.ml.text_rloo.config import TextRLOOConfig


def train(
    config: TextRLOOConfig,
    prompts: Sequence[str],
    reward_funcs: Sequence[Callable[..., Sequence[float]]],
    *,
    output_dir: str | Path,
    progress: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: str | Path | None = None,
) -> TextGRPOResult:
    """RLOO on ``prompts``; the policy (a LoRA adapter, or the whole model) is saved to ``output_dir``."""
    from trl import RLOOConfig, RLOOTrainer

    return run_online(
        config, prompts, reward_funcs, output_dir=output_dir, progress=progress,
        trl_config=RLOOConfig, trl_trainer=RLOOTrainer, should_stop=should_stop, resume_from=resume_from,
    )  # fmt: skip
