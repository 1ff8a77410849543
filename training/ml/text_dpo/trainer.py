"""Text DPO: TRL's ``DPOTrainer`` on the pairs people judged, read top to bottom.

TRL does the algorithm (the policy's and the reference's log-probabilities of the chosen and the
rejected response, the sigmoid loss with ``beta``); this module maps our config onto
``trl.DPOConfig``, hands TRL the pairs as a ``datasets.Dataset`` with its ``prompt`` / ``chosen`` /
``rejected`` columns, reports TRL's per-step logs, and writes the final policy atomically. The
reference is the policy before training: with LoRA, the same network with its adapter disabled;
without, TRL loads a second copy from the same local directory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from training.ml.text_dpo.config import TextDPOConfig
from training.ml.text_grpo.trainer import (
    TextGRPOResult,
    load_policy_tokenizer,
    lora_config,
    report_callback,
    save_final_policy,
    trainer_arguments,
)

Pair = tuple[str, str, str]  # prompt, chosen, rejected

# TRL's log keys -> ours.
LOG_KEYS = {
    "loss": "loss",
    "rewards/accuracies": "implicit_accuracy",
    "rewards/margins": "margin",
    "rewards/chosen": "chosen_reward",
    "rewards/rejected": "rejected_reward",
    "logps/chosen": "chosen_logp",
    "logps/rejected": "rejected_logp",
}


def train(
    config: TextDPOConfig,
    pairs: Sequence[Pair],
    *,
    output_dir: str | Path,
    progress: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: str | Path | None = None,
) -> TextGRPOResult:
    """DPO on ``pairs``; the policy (a LoRA adapter, or the whole model) is saved to
    ``output_dir/final``, checkpoints to ``output_dir/checkpoint-<step>``. ``resume_from``: a
    checkpoint of this run to continue from (model, optimizer, scheduler and RNG states)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    config.validate()
    if not pairs:
        raise ValueError("no judged pairs to train on")
    for prompt, chosen, rejected in pairs:
        if not all(isinstance(t, str) for t in (prompt, chosen, rejected)):
            raise ValueError("text DPO trains on (prompt, chosen, rejected) strings")
    path, tokenizer = load_policy_tokenizer(config)
    out = Path(output_dir)
    result = TextGRPOResult(output_dir=out)
    args = DPOConfig(
        **trainer_arguments(config, out),
        per_device_train_batch_size=config.batch_size,
        max_length=config.max_length,
    )
    report = report_callback(
        result, log_keys=LOG_KEYS, marker="loss", progress=progress, should_stop=should_stop
    )

    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in pairs],
            "chosen": [c for _, c, _ in pairs],
            "rejected": [r for _, _, r in pairs],
        }
    )
    trainer = DPOTrainer(
        model=str(path),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[report],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_final_policy(trainer, tokenizer, out)
    return result
