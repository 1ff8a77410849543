"""The one list of reward-model kinds. Model choices, the API, the admin form and the CLI derive
from it (no torch, no Django here: the web process imports it)."""

from __future__ import annotations

KINDS: dict[str, str] = {
    "bt": "Bradley-Terry head",
    "aspects": "Multi-aspect heads",
    "ensemble": "Ensemble of BT heads (uncertainty)",
    "artifact": "Artifact classifier",
    "finetune": "Encoder fine-tuning (last layers or LoRA) + BT head",
}

# Kinds whose versions can be a project's active reward model (an artifact classifier scores
# samples, not preferences).
ACTIVE_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k != "artifact")
