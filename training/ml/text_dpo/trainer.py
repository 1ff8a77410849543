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
from typing import Any

from training.ml.text_dpo.config import TextDPOConfig
from training.ml.text_grpo.trainer import TextGRPOResult, lora_config, save_final_policy, torch_dtype

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
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    config.validate()
    if not pairs:
        raise ValueError("no judged pairs to train on")
    for prompt, chosen, rejected in pairs:
        if not all(isinstance(t, str) for t in (prompt, chosen, rejected)):
            raise ValueError("text DPO trains on (prompt, chosen, rejected) strings")
    path = Path(config.policy)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a transformers model directory (no config.json)")
    out = Path(output_dir)
    result = TextGRPOResult(output_dir=out)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        raise ValueError(f"{path}: the tokenizer has no eos_token, so a response could never end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = DPOConfig(
        output_dir=str(out),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        beta=config.beta,
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 500,
        report_to="none",
        seed=config.seed,
        use_cpu=config.device == "cpu",
        bf16=config.dtype == "bfloat16",
        fp16=config.dtype == "float16",
        model_init_kwargs={"dtype": torch_dtype(config.dtype)},
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class Report(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return
            row = {"step": float(state.global_step)} | {
                ours: float(logs[k]) for k, ours in LOG_KEYS.items() if k in logs
            }
            result.metrics.append(row)
            if progress is not None:
                progress(row)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if should_stop is not None and should_stop():
                control.should_training_stop = True

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
        callbacks=[Report()],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_final_policy(trainer, tokenizer, out)
    return result
