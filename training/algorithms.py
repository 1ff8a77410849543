"""The one list of RL algorithms: name -> (config class, trainer module, modality). The model's
choices, the services and (next) the API and admin derive from it. Imports of the trainers are
lazy, so a web process never imports torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Algorithm:
    name: str
    label: str
    config: str  # "module:Class"
    trainer: str  # module with ``train``
    modality: str  # what the policy generates: image, video or text
    model_field: str  # the config field naming the model directory
    online: bool  # samples and scores (True) or learns from judged pairs (False)
    model_kinds: tuple[str, ...]  # what training.ml.model_dirs must find in the model directory
    memory: tuple[str, ...] = ()  # config fields that set peak memory, named when a run runs out

    def config_class(self) -> Any:
        module, _, cls = self.config.partition(":")
        return getattr(importlib.import_module(module), cls)

    def train_fn(self) -> Any:
        return importlib.import_module(self.trainer).train


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "ddpo",
            "DDPO (diffusion)",
            "training.ml.ddpo.config:DDPOConfig",
            "training.ml.ddpo.trainer",
            "image",
            "pipeline",
            True,
            ("unet",),
            ("train_batch_size", "prompts_per_iteration", "images_per_prompt", "resolution", "sample_steps"),
        ),
        Algorithm(
            "diffusion_grpo",
            "GRPO (diffusion)",
            "training.ml.diffusion_grpo.config:DiffusionGRPOConfig",
            "training.ml.diffusion_grpo.trainer",
            "image",
            "pipeline",
            True,
            ("unet",),
            ("train_batch_size", "prompts_per_iteration", "group_size", "resolution", "sample_steps"),
        ),
        Algorithm(
            "flow_grpo",
            "Flow-GRPO (flow-matching images)",
            "training.ml.flow_grpo.config:FlowGRPOConfig",
            "training.ml.flow_grpo.trainer",
            "image",
            "pipeline",
            True,
            ("flow",),
            ("train_batch_size", "prompts_per_iteration", "group_size", "resolution", "sample_steps"),
        ),
        Algorithm(
            "video_grpo",
            "Flow-GRPO (text-to-video)",
            "training.ml.flow_grpo.config:VideoGRPOConfig",
            "training.ml.flow_grpo.trainer",
            "video",
            "pipeline",
            True,
            ("video",),
            (
                "train_batch_size",
                "prompts_per_iteration",
                "group_size",
                "frames",
                "resolution",
                "sample_steps",
            ),
        ),
        Algorithm(
            "diffusion_dpo",
            "Diffusion-DPO (offline, judged pairs)",
            "training.ml.diffusion_dpo.config:DiffusionDPOConfig",
            "training.ml.diffusion_dpo.trainer",
            "image",
            "pipeline",
            False,
            ("unet",),
            ("batch_size", "resolution"),
        ),
        Algorithm(
            "text_grpo",
            "GRPO (text, TRL)",
            "training.ml.text_grpo.config:TextGRPOConfig",
            "training.ml.text_grpo.trainer",
            "text",
            "policy",
            True,
            ("causal_lm",),
            ("prompts_per_step", "num_generations", "max_completion_length"),
        ),
        Algorithm(
            "text_rloo",
            "RLOO (text, TRL)",
            "training.ml.text_rloo.config:TextRLOOConfig",
            "training.ml.text_rloo.trainer",
            "text",
            "policy",
            True,
            ("causal_lm",),
            ("prompts_per_step", "num_generations", "max_completion_length"),
        ),
        Algorithm(
            "text_dpo",
            "DPO (text, TRL, offline, judged pairs)",
            "training.ml.text_dpo.config:TextDPOConfig",
            "training.ml.text_dpo.trainer",
            "text",
            "policy",
            False,
            ("causal_lm",),
            ("batch_size", "max_length"),
        ),
    )
}
ALGORITHM_CHOICES = [(a.name, a.label) for a in ALGORITHMS.values()]
