"""Text GRPO: TRL's ``GRPOTrainer`` with our reward as a plain callable, read top to bottom.

TRL does the algorithm (G completions per prompt, group-standardised advantages, the clipped
token-level objective, the optional KL to the reference); this module only maps our config onto
``trl.GRPOConfig``, hands TRL the prompts as a ``datasets.Dataset`` and the reward functions as
they are (``rewards.ml.reward_fn.RewardFunction`` is called with ``prompts=`` and
``completions=`` and returns one float per completion), and reports TRL's own per-step logs.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.ml.text_grpo.config import TextGRPOConfig

# TRL's log keys -> ours (the same names the diffusion trainers use where they mean the same).
LOG_KEYS = {
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "zero_spread_groups",
    "kl": "kl",
    "loss": "loss",
    "clip_ratio/region_mean": "clip_fraction",
    "completions/mean_length": "completion_length",
}


@dataclass
class TextGRPOResult:
    metrics: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None


def _checked(fn: Callable[..., Sequence[float]]) -> Callable[..., list[float]]:
    """A reward function whose output is checked (it is untrusted): one finite float per completion."""

    def call(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        values = [float(v) for v in fn(prompts=prompts, completions=completions, **kwargs)]
        if len(values) != len(completions):
            raise ValueError(
                f"the reward function returned {len(values)} values for {len(completions)} completions"
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError("the reward function returned NaN or infinity")
        return values

    call.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return call


def torch_dtype(name: str) -> Any:
    """The torch dtype of a config's ``dtype`` name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lora_config(config: Any) -> Any:
    """peft's ``LoraConfig`` for a text config's ``lora_*`` fields, or None when ``lora_rank`` is 0."""
    from peft import LoraConfig

    if not config.lora_rank:
        return None
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        # peft's shorthand for every linear layer but the output head is a string, not a module name.
        target_modules="all-linear" if config.lora_targets == ["all-linear"] else config.lora_targets,
        task_type="CAUSAL_LM",
    )


def continued_adapter(config: Any, path: Path) -> Any:
    """The policy at ``path`` with the peft LoRA adapter ``config.init_lora`` loaded trainable. An
    adapter of another rank, alpha or targets than the config's is refused by name (the run would
    silently train something else than configured)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    try:
        saved = PeftConfig.from_pretrained(config.init_lora)
    except (OSError, ValueError) as exc:
        raise ValueError(f"init_lora: {config.init_lora} is not a peft adapter: {exc}") from exc
    for name, mine, theirs in (
        ("lora_rank", config.lora_rank, getattr(saved, "r", None)),
        ("lora_alpha", config.lora_alpha, getattr(saved, "lora_alpha", None)),
    ):
        if mine != theirs:
            raise ValueError(f"init_lora: the adapter has {name} {theirs}, the config {mine}")
    targets = getattr(saved, "target_modules", None)
    if config.lora_targets != ["all-linear"] and set(config.lora_targets) != set(targets or ()):
        raise ValueError(
            f"init_lora: the adapter targets {sorted(targets or ())}, the config {config.lora_targets}"
        )
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(config.dtype))
    return PeftModel.from_pretrained(base, config.init_lora, is_trainable=True)


def load_policy_tokenizer(config: Any) -> tuple[Path, Any]:
    """The policy's directory and its tokenizer (a pad token set to eos when it has none); refused
    when the directory is not a transformers model or the tokenizer can never end a response."""
    from transformers import AutoTokenizer

    path = Path(config.policy)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a transformers model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        raise ValueError(f"{path}: the tokenizer has no eos_token, so a response could never end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer


def trainer_arguments(config: Any, out: Path) -> dict[str, Any]:
    """The ``transformers.TrainingArguments`` every text trainer sets the same way from our config:
    steps, logging every step, checkpoints every ``checkpoint_every``, seed, device and precision."""
    return {
        "output_dir": str(out),
        "max_steps": config.steps,
        "learning_rate": config.learning_rate,
        "beta": config.beta,
        "logging_steps": 1,
        "save_strategy": "steps" if config.checkpoint_every else "no",
        "save_steps": config.checkpoint_every or 500,
        "report_to": "none",
        "seed": config.seed,
        "use_cpu": config.device == "cpu",
        "bf16": config.dtype == "bfloat16",
        "fp16": config.dtype == "float16",
        "model_init_kwargs": {"dtype": torch_dtype(config.dtype)},
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def report_callback(
    result: TextGRPOResult,
    *,
    log_keys: dict[str, str],
    marker: str,
    progress: Callable[[dict[str, float]], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Any:
    """A ``TrainerCallback`` that turns each of TRL's training logs (the ones holding ``marker``)
    into our metrics row (``log_keys``: TRL's key -> ours), and stops after the step in which
    ``should_stop`` says so (the run still saves what it has)."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not logs or marker not in logs:
                return
            row = {"step": float(state.global_step)} | {
                ours: float(logs[k]) for k, ours in log_keys.items() if k in logs
            }
            result.metrics.append(row)
            if progress is not None:
                progress(row)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if should_stop is not None and should_stop():
                control.should_training_stop = True

    return Report()


def train(
    config: TextGRPOConfig,
    prompts: Sequence[str],
    reward_funcs: Sequence[Callable[..., Sequence[float]]],
    *,
    output_dir: str | Path,
    progress: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: str | Path | None = None,
) -> TextGRPOResult:
    """GRPO on ``prompts``; the policy (a LoRA adapter, or the whole model) is saved to
    ``output_dir``. ``should_stop`` is asked after every step (a cancelled job stops there and
    still saves what it has). ``resume_from``: a checkpoint of this run to continue from."""
    from trl import GRPOConfig, GRPOTrainer

    return run_online(
        config, prompts, reward_funcs, output_dir=output_dir, progress=progress,
        trl_config=GRPOConfig, trl_trainer=GRPOTrainer, should_stop=should_stop, resume_from=resume_from,
    )  # fmt: skip


def run_online(
    config: TextGRPOConfig,
    prompts: Sequence[str],
    reward_funcs: Sequence[Callable[..., Sequence[float]]],
    *,
    output_dir: str | Path,
    progress: Callable[[dict[str, float]], None] | None,
    trl_config: Any,
    trl_trainer: Any,
    should_stop: Callable[[], bool] | None = None,
    resume_from: str | Path | None = None,
) -> TextGRPOResult:
    """One of TRL's online trainers that share GRPO's interface (``GRPOTrainer``, ``RLOOTrainer``)
    with our config, prompts and reward callables. ``resume_from``: a checkpoint (``checkpoint-<step>``
    written by this run, with the optimizer, scheduler and RNG states TRL saves) to continue from."""
    import datasets

    config.validate()
    if not prompts:
        raise ValueError("no prompts to sample from")
    path, tokenizer = load_policy_tokenizer(config)
    out = Path(output_dir)
    result = TextGRPOResult(output_dir=out)
    args = trl_config(
        **trainer_arguments(config, out),
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        epsilon=config.epsilon,
    )
    report = report_callback(
        result, log_keys=LOG_KEYS, marker="reward", progress=progress, should_stop=should_stop
    )
    model: Any = str(path)
    peft_config = lora_config(config)
    if config.init_lora:  # TRL trains a PeftModel it is given (and takes no peft_config beside it)
        model, peft_config = continued_adapter(config, path), None
    trainer = trl_trainer(
        model=model,
        reward_funcs=[_checked(f) for f in reward_funcs],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": list(prompts)}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[report],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_final_policy(trainer, tokenizer, out)
    return result


def save_final_policy(trainer: Any, tokenizer: Any, out: Path) -> Path:
    """The trained policy (a LoRA adapter, or the whole model) and its tokenizer as ``out/final``,
    written beside and renamed into place: a reader never sees half a policy."""
    tmp, final = out / ".final.tmp", out / "final"
    if tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
