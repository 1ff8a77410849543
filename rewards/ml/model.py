"""Trained reward models: scoring, pair probabilities, ``save_pretrained`` / ``load_reward_model``.

Every kind is the same network (``heads.Pool`` -> ``heads.Scorer`` with H stacked heads, plus one tie
parameter per head for the pairwise kinds); the kinds differ in what the H outputs mean:

- ``bt``: one head, the reward.
- ``aspects``: head 0 is the overall reward, then one head per aspect (``config["aspects"]``).
- ``ensemble``: one head per member; reward = member mean, uncertainty = member std (ddof 0).
- ``artifact``: one head, the artifact logit; reward = -logit (higher = cleaner).

A saved directory holds ``config.json`` and ``model.safetensors`` (the plain state dict), so it can be read
with ``json`` and ``safetensors.torch.load_file`` without this package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import safetensors.torch
import torch
from torch import nn

from rewards.ml.data import PairSet
from rewards.ml.heads import Pool, Scorer, decisive_logit, outcome_log_probs, scorer_inputs, torch_dtype

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ScoreOutput:
    """Scores of N samples (numpy)."""

    reward: np.ndarray  # (N,) higher = better
    uncertainty: np.ndarray | None = None  # (N,) ensembles: std of the members' rewards
    aspects: dict[str, np.ndarray] = field(default_factory=dict)  # aspect models: (N,) reward per aspect
    artifact_prob: np.ndarray | None = None  # (N,) artifact models: probability of an artifact


@dataclass
class PairOutputs:
    """Raw head outputs ``(P, H)`` for the two samples of P pairs; index it to take a subset of pairs."""

    a: torch.Tensor
    b: torch.Tensor

    def __getitem__(self, index: np.ndarray) -> PairOutputs:
        i = torch.as_tensor(index, dtype=torch.long)
        return PairOutputs(self.a[i], self.b[i])

    def __len__(self) -> int:
        return int(self.a.shape[0])


class RewardModel(nn.Module):
    """The shared interface of every kind (see the module docstring for what each kind's heads mean)."""

    kind: ClassVar[str] = ""
    pairwise: ClassVar[bool] = True  # trained on pairs, has tie parameters

    def __init__(self, *, config: dict[str, Any], dim: int, k: int, prompt_conditioned: bool) -> None:
        super().__init__()
        self.config = dict(config)
        self.dim = dim
        self.k = k
        self.prompt_conditioned = prompt_conditioned
        self.ties: str = config.get("ties", "none")
        self.curves: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        n = self.n_heads
        self.pool = Pool(dim, config["pooling"], n)
        in_dim = 2 * dim if prompt_conditioned else dim
        self.scorer = Scorer(in_dim, config["hidden"], config["hidden_layers"], n, config["dropout"])
        # log nu (Davidson) or log(theta - 1) (Rao-Kupper), one per head; unused for ties="none".
        self.tie_param = nn.Parameter(torch.zeros(n)) if self.pairwise else None
        # Per head, fitted after training on the inner validation split (``heads.head_temperatures``): every
        # output is divided by it before use, so probabilities come out calibrated. 1 = uncalibrated.
        self.register_buffer("temperature", torch.ones(n))
        # What training decided (best epoch, split sizes, L2, temperature); saved in config.json.
        self.fit_summary: dict[str, Any] = {}

    temperature: torch.Tensor

    @property
    def n_heads(self) -> int:
        return 1

    @property
    def aspect_names(self) -> list[str]:
        return []

    @torch.no_grad()
    def set_temperature(self, temperature: torch.Tensor) -> None:
        """Set the ``(H,)`` temperatures that scoring divides the head outputs by (all > 0)."""
        if temperature.shape != (self.n_heads,) or not bool((temperature > 0).all()):
            raise ValueError(
                f"temperature must be {self.n_heads} positive values, got {temperature.tolist()}"
            )
        self.temperature.copy_(temperature.to(self.temperature))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
        """Raw head outputs ``(N, H)`` of ``x (N, K, D)``, ``mask (N, K)``, ``prompt (N, D) | None``, before
        the temperature (what training optimises)."""
        return self.scorer(scorer_inputs(self.pool(x, mask), prompt if self.prompt_conditioned else None))

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on the scorer's weight matrices only (not biases, tie parameters or
        attention queries, where shrinking towards 0 means something else)."""
        decay: list[nn.Parameter] = []
        rest: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            (decay if name.startswith(("scorer.weights.", "scorer.out_weight")) else rest).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    # --- scoring -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def head_outputs(
        self, x: np.ndarray, mask: np.ndarray | None, prompt: np.ndarray | None, *, batch_size: int = 8192
    ) -> torch.Tensor:
        """Head outputs ``(N, H)`` on the CPU, computed in eval mode in chunks of ``batch_size`` and divided by
        the temperature: what scoring, pair probabilities and metrics use."""
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape (N, K, {self.dim}), got {x.shape}")
        n, k = x.shape[:2]
        if mask is None:
            mask = np.ones((n, k), dtype=bool)
        if mask.shape != (n, k):
            raise ValueError(f"mask must have shape {(n, k)}, got {mask.shape}")
        if n and not mask.any(axis=1).all():
            raise ValueError("every sample needs at least one unmasked vector (mask row all False)")
        if self.prompt_conditioned:
            if prompt is None:
                raise ValueError("this reward model is prompt-conditioned: pass the prompt embeddings")
            if prompt.shape != (n, self.dim):
                raise ValueError(f"prompt must have shape {(n, self.dim)}, got {prompt.shape}")
        param = next(self.parameters())
        device, dtype = param.device, param.dtype
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                xb = torch.as_tensor(x[sl]).to(device=device, dtype=dtype)
                mb = torch.as_tensor(mask[sl]).to(device=device, dtype=torch.bool)
                pb = None
                if self.prompt_conditioned:
                    assert prompt is not None
                    pb = torch.as_tensor(prompt[sl]).to(device=device, dtype=dtype)
                chunks.append((self(xb, mb, pb) / self.temperature).cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.zeros((0, self.n_heads), dtype=dtype)
        return torch.cat(chunks)

    def score(
        self, x: np.ndarray, mask: np.ndarray | None, prompt: np.ndarray | None, *, batch_size: int = 8192
    ) -> ScoreOutput:
        """Score N samples: ``x (N, K, D)``, ``mask (N, K)`` (None = all real), ``prompt (N, D)`` (needed
        when ``prompt_conditioned``, ignored otherwise)."""
        return self._interpret(self.head_outputs(x, mask, prompt, batch_size=batch_size))

    def conservative_reward(
        self,
        x: np.ndarray,
        mask: np.ndarray | None,
        prompt: np.ndarray | None,
        k: float = 1.0,
        *,
        batch_size: int = 8192,
    ) -> np.ndarray:
        """A reward for RL that does not trust what the model is unsure of: ensembles give mean - k * std,
        the other kinds their plain reward."""
        out = self.score(x, mask, prompt, batch_size=batch_size)
        if out.uncertainty is None:
            return out.reward
        return out.reward - k * out.uncertainty

    def _interpret(self, out: torch.Tensor) -> ScoreOutput:
        return ScoreOutput(reward=out[:, 0].numpy())

    # --- pairs -----------------------------------------------------------------------------------------

    def pair_outputs(self, pairs: PairSet, *, batch_size: int = 8192) -> PairOutputs:
        """Head outputs of both samples of every pair, scoring each referenced sample once."""
        used, inverse = np.unique(np.concatenate([pairs.a, pairs.b]), return_inverse=True)
        prompt = pairs.prompt[used] if (self.prompt_conditioned and pairs.prompt is not None) else None
        out = self.head_outputs(pairs.x[used], pairs.mask[used], prompt, batch_size=batch_size)
        index = torch.as_tensor(inverse, dtype=torch.long)
        p = pairs.num_pairs
        return PairOutputs(out[index[:p]], out[index[p:]])

    def _outputs(self, pairs: PairSet | PairOutputs) -> PairOutputs:
        return pairs if isinstance(pairs, PairOutputs) else self.pair_outputs(pairs)

    def _head(self, aspect: str | None) -> int:
        if aspect is None:
            return 0
        if aspect not in self.aspect_names:
            raise ValueError(f"this model has no head for aspect {aspect!r} (has: {self.aspect_names})")
        return 1 + self.aspect_names.index(aspect)

    def _decisive_probs(self, out: PairOutputs) -> torch.Tensor:
        """``(P, H)``: per head, P(a beats b | the pair is decisive)."""
        assert self.tie_param is not None
        tie_param = self.tie_param.detach().cpu()
        with torch.no_grad():
            return torch.sigmoid(decisive_logit(out.a - out.b, tie_param, self.ties))

    def prob_first_wins(self, pairs: PairSet | PairOutputs, *, aspect: str | None = None) -> np.ndarray:
        """``(P,)`` probability that ``a`` beats ``b`` given the pair is decisive (sigmoid(r_a - r_b) for
        Bradley-Terry and Davidson; the exact conditional for Rao-Kupper). ``aspect`` picks an aspect head
        of an aspect model."""
        return self._decisive_probs(self._outputs(pairs))[:, self._head(aspect)].numpy()

    def pair_uncertainty(self, pairs: PairSet | PairOutputs) -> np.ndarray | None:
        """``(P,)`` spread of the members' ``prob_first_wins`` (ensembles); None for the other kinds."""
        return None

    def outcome_probs(self, pairs: PairSet | PairOutputs, *, aspect: str | None = None) -> np.ndarray:
        """``(P, 3)`` probabilities of (a wins, tie, b wins) under the model's tie model (tie = 0 for
        ``ties="none"``)."""
        assert self.tie_param is not None
        out = self._outputs(pairs)
        h = self._head(aspect)
        with torch.no_grad():
            d = (out.a - out.b)[:, h]
            lp_a, lp_t, lp_b = outcome_log_probs(d, self.tie_param.detach().cpu()[h], self.ties)
            if self.ties == "none":
                lp_t = torch.full_like(d, -math.inf)
            return torch.stack([lp_a, lp_t, lp_b], dim=1).exp().numpy()

    # --- saving -----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, *, extra: dict[str, Any] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "dim": self.dim,
            "k": self.k,
            "prompt_conditioned": self.prompt_conditioned,
            "curves": _json_safe(self.curves),
            "fit_summary": _json_safe(self.fit_summary),
            "extra": _json_safe(extra if extra is not None else self.extra),
        }
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        safetensors.torch.save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


class BTRewardModel(RewardModel):
    kind = "bt"


class AspectsRewardModel(RewardModel):
    kind = "aspects"

    @property
    def n_heads(self) -> int:
        return 1 + len(self.config["aspects"])

    @property
    def aspect_names(self) -> list[str]:
        return list(self.config["aspects"])

    def _interpret(self, out: torch.Tensor) -> ScoreOutput:
        aspects = {name: out[:, i + 1].numpy() for i, name in enumerate(self.aspect_names)}
        return ScoreOutput(reward=out[:, 0].numpy(), aspects=aspects)


class EnsembleRewardModel(RewardModel):
    kind = "ensemble"

    @property
    def n_heads(self) -> int:
        return int(self.config["n_members"])

    def _interpret(self, out: torch.Tensor) -> ScoreOutput:
        return ScoreOutput(reward=out.mean(1).numpy(), uncertainty=out.std(1, correction=0).numpy())

    def prob_first_wins(self, pairs: PairSet | PairOutputs, *, aspect: str | None = None) -> np.ndarray:
        """The member-averaged probability that ``a`` beats ``b`` given the pair is decisive."""
        self._head(aspect)
        return self._decisive_probs(self._outputs(pairs)).mean(1).numpy()

    def pair_uncertainty(self, pairs: PairSet | PairOutputs) -> np.ndarray | None:
        return self._decisive_probs(self._outputs(pairs)).std(1, correction=0).numpy()

    def outcome_probs(self, pairs: PairSet | PairOutputs, *, aspect: str | None = None) -> np.ndarray:
        """Member-averaged (a wins, tie, b wins) probabilities."""
        assert self.tie_param is not None
        self._head(aspect)
        out = self._outputs(pairs)
        with torch.no_grad():
            lp_a, lp_t, lp_b = outcome_log_probs(out.a - out.b, self.tie_param.detach().cpu(), self.ties)
            if self.ties == "none":
                lp_t = torch.full_like(lp_a, -math.inf)
            return torch.stack([lp_a, lp_t, lp_b], dim=2).exp().mean(1).numpy()


class ArtifactRewardModel(RewardModel):
    kind = "artifact"
    pairwise = False

    def _interpret(self, out: torch.Tensor) -> ScoreOutput:
        logit = out[:, 0]
        return ScoreOutput(reward=(-logit).numpy(), artifact_prob=torch.sigmoid(logit).numpy())

    def _decisive_probs(self, out: PairOutputs) -> torch.Tensor:
        # reward = -logit, so P(a cleaner than b) = sigmoid(logit_b - logit_a).
        return torch.sigmoid(out.b - out.a)

    def outcome_probs(self, pairs: PairSet | PairOutputs, *, aspect: str | None = None) -> np.ndarray:
        p = self.prob_first_wins(pairs, aspect=aspect)
        return np.stack([p, np.zeros_like(p), 1.0 - p], axis=1)


KINDS: dict[str, type[RewardModel]] = {
    "bt": BTRewardModel,
    "aspects": AspectsRewardModel,
    "ensemble": EnsembleRewardModel,
    "artifact": ArtifactRewardModel,
}


def load_reward_model(directory: str | Path, *, device: str = "cpu") -> RewardModel:
    """Load a directory written by ``save_pretrained`` (any kind) onto ``device``."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path} is not a reward model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise ValueError(f"{path} is not a reward model directory (kind {kind!r}, known: {sorted(KINDS)})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    config = meta["config"]
    model = KINDS[meta["kind"]](
        config=config,
        dim=int(meta["dim"]),
        k=int(meta["k"]),
        prompt_conditioned=bool(meta["prompt_conditioned"]),
    )
    model.to(dtype=torch_dtype(config.get("dtype", "float32")))
    state = safetensors.torch.load_file(str(path / WEIGHTS_NAME), device="cpu")
    # Saved before temperatures existed: uncalibrated, i.e. temperature 1.
    state.setdefault("temperature", torch.ones(model.n_heads, dtype=model.temperature.dtype))
    model.load_state_dict(state, strict=True)
    model.to(device=torch.device(device))
    model.curves = list(meta.get("curves") or [])
    model.fit_summary = dict(meta.get("fit_summary") or {})
    model.extra = dict(meta.get("extra") or {})
    model.eval()
    return model


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so config.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
