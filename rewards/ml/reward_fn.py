"""A reward model outside the app: ``RewardFunction.from_pretrained(version_dir)`` loads the encoder
and the head from the version directory alone (no database, no Django) and scores raw prompts and
outputs: text strings, PIL images, or videos as lists of frames (PIL images) or file paths.

    reward = RewardFunction.from_pretrained("var/media/reward_models/demo/v3-bt-job7")
    reward(prompts=["a red square"], completions=[image])            # -> [0.42]

It is a plain callable ``(prompts, outputs) -> list[float]`` in the form TRL's ``reward_funcs``
expects (TRL passes ``prompts=``, ``completions=`` and the dataset's other columns as keywords;
conversational completions, lists of ``{"role", "content"}`` messages, are scored on their last
assistant message), and what the diffusion trainers call with the images they sampled.

The scores are the app's: the same encoder, the same inputs (the response alone or the prompt and
the response together, as the head was trained), the same float16 rounding as the embedding cache
and the same head, so a sample scored here and in the app gets the same reward.

Layout of a version directory (written by ``rewards.services.jobs`` through ``bundle_encoder``):
``config.json`` + ``model.safetensors`` (the head, ``rewards.ml.model``) and ``encoder/`` (the
transformers encoder directory, hard links to the registered encoder's files where the filesystem
allows, copies otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rewards.ml.encoders import Encoder, load_encoder
from rewards.ml.encoders import _uniform_indices as uniform_indices
from rewards.ml.model import CONFIG_NAME, RewardModel, ScoreOutput, load_reward_model

ENCODER_DIR = "encoder"


def bundle_encoder(version_dir: str | Path, encoder_dir: str | Path) -> Path:
    """Put the encoder beside the head in ``version_dir`` (as ``encoder/``), so the directory is
    self-contained. Files are hard-linked when both are on one filesystem (no extra disk for a
    frozen encoder shared by every version), copied otherwise. Returns the bundled directory."""
    src = Path(encoder_dir).resolve()
    dst = Path(version_dir) / ENCODER_DIR
    if dst.resolve() == src:
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            target = tmp / rel / name
            try:
                os.link(Path(root) / name, target)
            except OSError:
                shutil.copy2(Path(root) / name, target)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def _text(value: Any) -> str:
    """A completion as text: a string, or the last assistant message of a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(m, dict) for m in value):
        for message in reversed(value):
            if message.get("role") in (None, "assistant"):
                return str(message.get("content", ""))
        return str(value[-1].get("content", ""))
    raise TypeError(f"a text reward model scores strings or conversations, got {type(value).__name__}")


def _half(x: np.ndarray) -> np.ndarray:
    # The embedding cache stores float16: round the same way so the scores match the app's.
    return np.asarray(x, dtype=np.float16).astype(np.float32)


class RewardFunction:
    """Scores (prompt, output) pairs with a saved reward model; see the module docstring."""

    def __init__(
        self, model: RewardModel, encoder: Encoder, *, frames: int = 8, batch_size: int = 32
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.frames = frames
        self.batch_size = batch_size
        # Prompt and text together only for a sentence encoder, as the app's embedding cache does
        # (``rewards.services.embeddings.embedding_input``); a config saved before the field: response.
        wanted = model.config.get("text_input", "response")
        self.text_input = "joint" if wanted == "joint" and encoder.info.family == "text" else "response"
        # TRL logs each reward function under its __name__.
        self.__name__ = f"rewardloop_{model.kind}"

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str = "cpu", frames: int | None = None
    ) -> RewardFunction:
        """Load the head and the bundled encoder of a version directory. ``frames``: frames per video
        (default: as many as the version was trained with)."""
        path = Path(directory)
        model = load_reward_model(path, device=device)
        encoder_dir = path / ENCODER_DIR
        if not (encoder_dir / "config.json").is_file():
            raise ValueError(f"{path} has no bundled encoder ({ENCODER_DIR}/config.json)")
        encoder = load_encoder(encoder_dir, device=device)
        meta = json.loads((path / CONFIG_NAME).read_text())
        trained_frames = int(((meta.get("extra") or {}).get("video_frames")) or 8)
        return cls(model, encoder, frames=frames or trained_frames)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any] | None = None,
        *,
        outputs: Sequence[Any] | None = None,
        **_columns: Any,
    ) -> list[float]:
        """One float per output, higher is better. ``outputs`` and ``completions`` (TRL's name) are
        the same argument; dataset columns TRL passes along are ignored."""
        prompt_texts, items = self.inputs(prompts, completions, outputs)
        if not items:
            return []
        return [float(v) for v in self.score(prompt_texts, items)]

    @staticmethod
    def inputs(
        prompts: Sequence[Any], completions: Sequence[Any] | None, outputs: Sequence[Any] | None
    ) -> tuple[list[str], list[Any]]:
        """The prompts as texts and the outputs as a list, as ``__call__`` takes them (TRL's names
        or ours); refused when their counts differ."""
        items = list(outputs if outputs is not None else completions if completions is not None else [])
        prompt_texts = [_text(p) for p in prompts]
        if len(prompt_texts) != len(items):
            raise ValueError(f"{len(prompt_texts)} prompts for {len(items)} outputs")
        return prompt_texts, items

    def score(self, prompts: Sequence[str], outputs: Sequence[Any]) -> np.ndarray:
        """Rewards ``(N,)`` of outputs (all texts, all images or all videos) under their prompts."""
        return np.asarray(self.score_output(prompts, outputs).reward, dtype=np.float64)

    def score_output(self, prompts: Sequence[str], outputs: Sequence[Any]) -> ScoreOutput:
        """Everything the head says of each output: the reward, and for an ensemble the members'
        spread (``uncertainty``), for an artifact classifier ``artifact_prob``, for an aspects model
        the per-aspect rewards."""
        x, mask = self._embed(prompts, outputs)
        prompt = _half(self.encoder.embed_texts(list(prompts), batch_size=self.batch_size))
        return self.model.score(x, mask, prompt)

    @property
    def kind(self) -> str:
        """The head's kind: bt, aspects, ensemble or artifact."""
        return str(self.model.kind)

    def _embed(self, prompts: Sequence[str], outputs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        n = len(outputs)
        first = outputs[0]
        if isinstance(first, Image.Image):
            vecs = self.encoder.embed_images(list(outputs), batch_size=self.batch_size)
            return _half(vecs)[:, None, :], np.ones((n, 1), dtype=bool)
        if isinstance(first, str | Path) and not isinstance(first, str):
            first = str(first)
        if isinstance(first, str | list | tuple) and self._is_video(first):
            return self._embed_videos(outputs)
        texts = [_text(o) for o in outputs]
        if self.text_input == "joint":
            vecs = self.encoder.embed_text_pairs(list(prompts), texts, batch_size=self.batch_size)
        else:
            vecs = self.encoder.embed_texts(texts, batch_size=self.batch_size)
        return _half(vecs)[:, None, :], np.ones((n, 1), dtype=bool)

    @staticmethod
    def _is_video(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return bool(value) and all(isinstance(f, Image.Image) for f in value)
        return isinstance(value, str) and Path(value).suffix.lower() in (".mp4", ".webm", ".mov", ".mkv")

    def _embed_videos(self, outputs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        k = self.frames
        x = np.zeros((len(outputs), k, self.encoder.info.dim), dtype=np.float32)
        mask = np.zeros((len(outputs), k), dtype=bool)
        for i, video in enumerate(outputs):
            if isinstance(video, str | Path):
                # A file: decoded as the app decodes an uploaded clip (k frames spread uniformly).
                vecs, m = self.encoder.embed_videos([video], frames=k, batch_size=self.batch_size)
                got = vecs[0][m[0]]
            else:
                frames = list(video)
                frames = [frames[j] for j in uniform_indices(len(frames), k)]  # as a decoded file
                got = self.encoder.embed_images(frames, batch_size=self.batch_size)
            x[i, : len(got)] = _half(got)
            mask[i, : len(got)] = True
        return x, mask


__all__ = ["ENCODER_DIR", "RewardFunction", "bundle_encoder"]
