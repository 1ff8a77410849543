"""Building blocks shared by the reward-model kinds: pooling, the scorer MLP, tie likelihoods, data prep.

Every head here is *stacked*: it computes ``H`` independent heads at once (one per ensemble member, or one
per aspect plus the overall one) with weights of shape ``(H, ...)`` and batched matmuls, so five heads
cost little more than one.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewards.ml.data import A_WINS, B_WINS, BOTH_BAD, MISSING, TIE, PairSet
from rewards.ml.progress import ConfigError

LOG2 = math.log(2.0)


class Pool(nn.Module):
    """Pools the K vectors of a sample into one.

    ``mean``: the mean over real (unmasked) vectors, shared by all heads -> ``(N, D)``.
    ``attention``: each head has a learned query ``q``; weights = softmax over real frames of
    ``sqrt(D) * <x_k, q>``, so a head can pick the frame that matters -> ``(N, H, D)``. The query starts
    at zero, i.e. as the mean. With K=1 both are the identity -> ``(N, D)``.
    """

    def __init__(self, dim: int, mode: str, n_heads: int) -> None:
        super().__init__()
        self.mode = mode
        self.scale = math.sqrt(dim)
        self.query = nn.Parameter(torch.zeros(n_heads, dim)) if mode == "attention" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x[:, 0]
        if self.query is None:
            m = mask.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(1) / m.sum(1)
        logits = torch.einsum("nkd,hd->nhk", x, self.query) * self.scale
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.einsum("nhk,nkd->nhd", torch.softmax(logits, dim=-1), x)


def scorer_inputs(pooled: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
    """``x``, or ``[x, x * prompt]`` when prompt-conditioned (PickScore-like: the product carries how
    well the sample matches its prompt). ``pooled`` is ``(N, D)`` or ``(N, H, D)``; ``prompt`` ``(N, D)``."""
    if prompt is None:
        return pooled
    if pooled.dim() == 3:
        prompt = prompt[:, None, :]
    return torch.cat([pooled, pooled * prompt], dim=-1)


class Scorer(nn.Module):
    """``H`` independent MLPs: standardise the inputs, ``hidden_layers`` x (linear, GELU, dropout), linear
    to a scalar. ``hidden=0`` makes each head linear. Input ``(N, I)`` shared or ``(N, H, I)`` per head;
    output ``(N, H)``.

    The standardisation (``feature_mean``/``feature_std`` buffers, set once from the training data by
    ``fit_standardiser``) matters because unit-norm embeddings have tiny coordinates (about 1/sqrt(D), and
    1/D for ``x * prompt``) and a shared offset, which would otherwise make AdamW's fixed step size too
    small for some inputs and too large for others.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, in_dim: int, hidden: int, hidden_layers: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        widths = [in_dim] + ([hidden] * hidden_layers if hidden > 0 else [])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(widths):
            self.weights.append(nn.Parameter(_uniform((n_heads, fan_in, fan_out), fan_in)))
            self.biases.append(nn.Parameter(_uniform((n_heads, fan_out), fan_in)))
        self.out_weight = nn.Parameter(_uniform((n_heads, widths[-1]), widths[-1]))
        self.out_bias = nn.Parameter(torch.zeros(n_heads))
        self.dropout = nn.Dropout(dropout)
        self.n_heads = n_heads

    @torch.no_grad()
    def fit_standardiser(self, inputs: torch.Tensor) -> None:
        """Set the input standardisation from ``(N, I)`` training inputs."""
        mean = inputs.mean(0)
        # Not Tensor.std(0): a column reduction that is ~10x slower on CPU than this.
        std = (inputs - mean).square().mean(0).sqrt()
        # A column that (almost) never varied in training carries nothing to learn from; dividing by its
        # tiny std would blow up any new value in it, so it keeps its raw scale instead.
        std = torch.where(std > 1e-3 * std.median(), std, torch.ones_like(std))
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The standardisation (z - mean) / std is folded into the first layer's weights and bias instead
        # of being applied to the (large) input: the same function, two fewer passes over the batch.
        scale = 1.0 / self.feature_std
        shift = self.feature_mean * scale
        n, h = z.shape[0], self.n_heads
        first = True
        for weight, bias in zip(self.weights, self.biases, strict=True):
            if first:
                bias = bias - torch.einsum("i,hio->ho", shift, weight)
                weight = weight * scale[:, None]
                first = False
            if z.dim() == 2:  # shared input: one matmul for all heads
                z = (z @ weight.permute(1, 0, 2).reshape(weight.shape[1], -1)).view(n, h, -1)
            else:
                z = torch.einsum("nhi,hio->nho", z, weight)
            z = self.dropout(F.gelu(z + bias))
        out_weight: torch.Tensor = self.out_weight
        out_bias: torch.Tensor = self.out_bias
        if first:  # linear head: the output layer is the first layer
            out_bias = out_bias - out_weight @ shift
            out_weight = out_weight * scale
        if z.dim() == 2:
            return z @ out_weight.T + out_bias
        return (z * out_weight).sum(-1) + out_bias


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    # nn.Linear's default initialisation, per head.
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


# --- tie likelihoods -----------------------------------------------------------------------------------


def outcome_log_probs(
    d: torch.Tensor, tie_param: torch.Tensor, ties: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities (a wins, tie, b wins) given ``d = r_a - r_b`` with ``r = log pi``.

    ``davidson``: nu = exp(tie_param); P(a>b) = pi_a / (pi_a + pi_b + nu sqrt(pi_a pi_b)) and
    P(tie) = nu sqrt(pi_a pi_b) / (same). Dividing through by sqrt(pi_a pi_b) leaves a logsumexp over
    (d/2, -d/2, log nu).
    ``rao_kupper``: theta = 1 + exp(tie_param) > 1; P(a>b) = pi_a / (pi_a + theta pi_b) =
    1 / (1 + exp(log theta - d)), P(tie) = (theta^2 - 1) pi_a pi_b / ((pi_a + theta pi_b)(pi_b + theta pi_a))
    = (theta^2 - 1) P(a>b) P(b>a), with log(theta^2 - 1) = tie_param + log(2 + exp(tie_param)).
    ``none``: plain Bradley-Terry, P(a>b) = sigmoid(d); the tie log-probability is returned as 0 (ties are
    never trained on then).
    ``tie_param`` broadcasts against ``d`` (one per head).
    """
    if ties == "davidson":
        half = d / 2
        log_nu = tie_param.expand_as(d)
        norm = torch.logsumexp(torch.stack([half, -half, log_nu]), dim=0)
        return half - norm, log_nu - norm, -half - norm
    if ties == "rao_kupper":
        log_theta = F.softplus(tie_param)
        lp_a = -F.softplus(log_theta - d)
        lp_b = -F.softplus(log_theta + d)
        log_theta2_m1 = tie_param + torch.logaddexp(torch.full_like(tie_param, LOG2), tie_param)
        return lp_a, log_theta2_m1 + lp_a + lp_b, lp_b
    if ties == "none":
        return F.logsigmoid(d), torch.zeros_like(d), F.logsigmoid(-d)
    raise ValueError(f"unknown tie model {ties!r}")


def decisive_logit(d: torch.Tensor, tie_param: torch.Tensor, ties: str) -> torch.Tensor:
    """log P(a>b) - log P(b>a): the logit of "a wins given somebody wins". Equals ``d`` for Davidson and
    plain BT; for Rao-Kupper it is ``softplus(log theta + d) - softplus(log theta - d)``."""
    if ties == "rao_kupper":
        lp_a, _, lp_b = outcome_log_probs(d, tie_param, ties)
        return lp_a - lp_b
    return d


def pair_nll(
    d: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, tie_param: torch.Tensor, ties: str
) -> torch.Tensor:
    """Sum over heads of each head's weighted mean negative log-likelihood.

    ``d``, ``target`` (1 a wins, 0 tie, -1 b wins) and ``weight`` are ``(B, H)``; a zero weight masks a
    pair out of a head. Summing (not averaging) the heads keeps every head's gradient what it would be
    trained alone.
    """
    lp_a, lp_t, lp_b = outcome_log_probs(d, tie_param, ties)
    logp = torch.where(target == 1, lp_a, torch.where(target == -1, lp_b, lp_t))
    per_head = -(weight * logp).sum(0) / weight.sum(0).clamp_min(1e-12)
    return per_head.sum()


# --- data preparation ------------------------------------------------------------------------------------


def pair_targets(
    outcome: np.ndarray, weight: np.ndarray, *, ties: str, both_bad: str
) -> tuple[np.ndarray, np.ndarray]:
    """Outcome codes -> (target in {1, 0, -1}, weight with 0 where the pair carries nothing).

    Dropped (weight 0): MISSING; BOTH_BAD unless ``both_bad="tie"``; TIE when ``ties="none"``.
    An unknown code raises ValueError.
    """
    outcome = np.asarray(outcome)
    known = np.isin(outcome, (A_WINS, B_WINS, TIE, BOTH_BAD, MISSING))
    if not known.all():
        raise ValueError(f"unknown outcome codes: {sorted(set(outcome[~known].tolist()))}")
    target = np.zeros(outcome.shape, dtype=np.int64)
    target[outcome == A_WINS] = 1
    target[outcome == B_WINS] = -1
    use = (outcome == A_WINS) | (outcome == B_WINS)
    if ties != "none":
        use |= outcome == TIE
        if both_bad == "tie":
            use |= outcome == BOTH_BAD
    return target, np.where(use, weight, 0.0).astype(np.float32)


def initial_tie_param(target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per column (head) of ``(P, H)`` targets/weights: the tie parameter whose tie probability at equal
    rewards is the data's tie rate t, log(2t / (1 - t)) (the same for Davidson, where P(tie | d=0) =
    nu / (2 + nu), and Rao-Kupper, where it is (theta - 1) / (theta + 1)). Starting there rather than at an
    arbitrary value spares the optimiser a long walk when ties are rare (or common)."""
    total = weight.sum(axis=0)
    ties = (weight * (target == 0)).sum(axis=0)
    t = np.clip(np.divide(ties, total, out=np.zeros_like(total), where=total > 0), 1e-3, 0.9)
    return np.log(2 * t / (1 - t))


def resolve_device(name: str) -> torch.device:
    """The config's device, or a ConfigError if this machine does not have it."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "'mps' requested but MPS is not available")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def check_features(pairs: PairSet) -> None:
    """Refuse data the heads cannot pool: a sample with no real vector, or non-finite features."""
    if not pairs.mask.any(axis=1).all():
        raise ValueError("every sample needs at least one unmasked vector (mask row all False)")
    if not np.isfinite(pairs.x).all() or (pairs.prompt is not None and not np.isfinite(pairs.prompt).all()):
        raise ValueError("features contain NaN or infinite values")
    if pairs.num_pairs and (
        pairs.a.min(initial=0) < 0
        or pairs.b.min(initial=0) < 0
        or max(pairs.a.max(initial=0), pairs.b.max(initial=0)) >= pairs.x.shape[0]
    ):
        raise ValueError("pair indices out of range of the samples")


def standardiser_sample(used: np.ndarray, rng: np.random.Generator, size: int = 16384) -> np.ndarray:
    """At most ``size`` of the samples ``used`` by the pairs: enough to estimate the input mean and std."""
    used = np.unique(used)
    return used if used.size <= size else np.sort(rng.choice(used, size, replace=False))


class DeviceFeatures:
    """The cached features of a ``PairSet`` on the training device, moved once; ``take`` gathers a batch."""

    def __init__(self, pairs: PairSet, device: torch.device, dtype: torch.dtype, use_prompt: bool) -> None:
        check_features(pairs)
        self.x = torch.as_tensor(pairs.x).to(device=device, dtype=dtype)
        self.mask = torch.as_tensor(pairs.mask).to(device=device, dtype=torch.bool)
        self.prompt = (
            torch.as_tensor(pairs.prompt).to(device=device, dtype=dtype)
            if use_prompt and pairs.prompt is not None
            else None
        )

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # index_select: several times faster than advanced indexing for row gathers on CPU.
        prompt = None if self.prompt is None else self.prompt.index_select(0, index)
        return self.x.index_select(0, index), self.mask.index_select(0, index), prompt

    def mean_inputs(self, index: torch.Tensor) -> torch.Tensor:
        """Mean-pooled scorer inputs of the samples at ``index``, to fit the standardiser."""
        x, mask, prompt = self.take(index)
        m = mask.to(x.dtype).unsqueeze(-1)
        return scorer_inputs((x * m).sum(1) / m.sum(1), prompt)


def cosine_lr(step: int, total_steps: int, lr: float) -> float:
    """Learning rate at ``step`` (0-based): a short linear warm-up (2% of steps), then cosine decay to 0."""
    warmup = max(1, total_steps // 50)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` torch CPU threads inside the block (None: leave the caller's setting alone)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- regularisation that adapts to the data size: inner validation split, L2, early stopping, temperature


def inner_split(
    n: int, groups: np.ndarray | None, *, fraction: float, min_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(fit, validation)`` of ``n`` training pairs: about ``fraction`` of them set aside as an
    inner validation split for early stopping and the temperature (never the job's held-out pairs).

    Whole ``groups`` (the pairs' comparisons; None: every pair its own) go to one side, so two votes on one
    comparison never straddle the split; deterministic in ``seed``. When ``fraction`` is 0 or either side
    would have fewer than ``min_pairs`` pairs, every pair fits and the validation side is empty (then the
    L2 penalty alone regularises and the temperature stays 1). The same rule as the finetune kind's
    ``rewards.ml.finetune.common.inner_split``."""
    everything = np.arange(n)
    wanted = round(fraction * n)
    if fraction <= 0 or wanted < min_pairs or n - wanted < min_pairs:
        return everything, everything[:0]
    keys = np.arange(n) if groups is None else np.asarray(groups)
    unique, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.random.default_rng([seed, 0x5EED]).permutation(unique.size)
    sizes = np.bincount(inverse, minlength=unique.size)[order]
    # Whole groups in a random order until the validation side has its share.
    held = np.isin(inverse, order[: int(np.searchsorted(np.cumsum(sizes), wanted)) + 1])
    if held.sum() < min_pairs or (~held).sum() < min_pairs:
        return everything, everything[:0]
    return everything[~held], everything[held]


# Measured on HH-RLHF harmless-base (bench/reward_quality.py): the L2 strength of the best logistic
# regression there, expressed per pair. The penalty per pair shrinks as 1/n, as in a Bayesian posterior.
AUTO_L2_PAIRS = 1000.0


def resolve_l2(l2: float | None, n_fit: int) -> float:
    """``l2``, or when None the data-size default ``AUTO_L2_PAIRS / n_fit``."""
    if l2 is not None:
        return float(l2)
    return AUTO_L2_PAIRS / max(1, n_fit)


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squares of the scorer's weight matrices (the parameters AdamW decays; biases, tie parameters
    and attention queries are left alone), summed over heads like the losses."""
    total: torch.Tensor | None = None
    for name, param in model.named_parameters():
        if name.startswith(("scorer.weights.", "scorer.out_weight")):
            term = param.square().sum()
            total = term if total is None else total + term
    assert total is not None
    return total


@torch.no_grad()
def pair_differences(
    model: nn.Module, features: DeviceFeatures, a: torch.Tensor, b: torch.Tensor, *, batch_size: int = 8192
) -> torch.Tensor:
    """``(P, H)`` raw ``r_a - r_b`` of the pairs ``(a, b)`` in eval mode (no temperature), in chunks."""
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, a.shape[0], batch_size):
            sa, sb = a[start : start + batch_size], b[start : start + batch_size]
            x, mask, prompt = features.take(torch.cat([sa, sb]))
            r_a, r_b = model(x, mask, prompt).split(sa.shape[0])
            chunks.append(r_a - r_b)
    finally:
        model.train(was_training)
    return torch.cat(chunks)


class BestWeights:
    """Early stopping: remembers the weights of the evaluation with the lowest validation loss and says to
    stop after ``patience`` evaluations without a better one (0: never stop early)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_epoch = 0
        self.stale = 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, loss: float, model: nn.Module, epoch: int) -> bool:
        """Record the loss after ``epoch``; True when training should stop now."""
        if loss < self.best - 1e-7 * max(1.0, abs(self.best)) or self.state is None:
            self.best, self.best_epoch, self.stale = loss, epoch, 0
            self.state = copy.deepcopy(model.state_dict())
            return False
        self.stale += 1
        return self.patience > 0 and self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def fit_temperature(prob_at: Callable[[float], np.ndarray], y: np.ndarray, w: np.ndarray) -> float:
    """The temperature T that minimises the weighted negative log-likelihood of decisive outcomes ``y``
    (1 = a won) under ``prob_at(T)``, the probability that a wins with every reward divided by T.

    One parameter, so a search does: a grid over log T in [log 0.05, log 20], then golden-section steps
    around the best grid point. 1.0 when there is nothing to fit on."""
    if y.size == 0 or w.sum() <= 0:
        return 1.0

    def nll(log_t: float) -> float:
        p = np.clip(prob_at(math.exp(log_t)).astype(np.float64), 1e-12, 1 - 1e-12)
        return float(-(w * np.where(y == 1, np.log(p), np.log1p(-p))).sum() / w.sum())

    grid = np.linspace(math.log(0.05), math.log(20.0), 41)
    losses = [nll(float(g)) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = nll(c), nll(d)
    for _ in range(40):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = nll(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = nll(d)
    best = (lo + hi) / 2
    # The grid point wins if the refinement (on a flat or odd curve) did not beat it.
    return math.exp(best if nll(best) <= losses[i] else float(grid[i]))


def head_temperatures(
    d: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    tie_param: torch.Tensor,
    ties: str,
    *,
    shared: bool,
) -> torch.Tensor:
    """``(H,)`` temperatures from validation ``d = r_a - r_b`` ``(P, H)``, targets and weights ``(P, H)``:
    per head on its decisive pairs, or with ``shared`` one for all heads fitted on the heads' mean
    probability (an ensemble's prediction)."""
    d64, tie64 = d.double().cpu(), tie_param.detach().double().cpu()
    target_np, weight_np = target.cpu().numpy(), weight.double().cpu().numpy()

    def probs(t: float) -> np.ndarray:
        return torch.sigmoid(decisive_logit(d64 / t, tie64, ties)).numpy()

    heads = d.shape[1]
    if shared:
        decisive = (target_np[:, 0] != 0) & (weight_np[:, 0] > 0)
        y = (target_np[decisive, 0] == 1).astype(np.float64)
        temp = fit_temperature(lambda t: probs(t)[decisive].mean(1), y, weight_np[decisive, 0])
        return torch.full((heads,), temp)
    out = torch.ones(heads)
    for h in range(heads):
        decisive = (target_np[:, h] != 0) & (weight_np[:, h] > 0)
        y = (target_np[decisive, h] == 1).astype(np.float64)

        def head_probs(t: float, h: int = h, m: np.ndarray = decisive) -> np.ndarray:
            return probs(t)[m, h]

        out[h] = fit_temperature(head_probs, y, weight_np[decisive, h])
    return out


def fit_summary(
    model: nn.Module, best: BestWeights, fit_pairs: int, val_pairs: int, epochs_run: int, l2: float
) -> dict[str, Any]:
    """What training decided, for ``RewardModel.fit_summary`` (saved in config.json, shown with the
    version's metrics): split sizes, epochs run, the epoch whose weights were kept, its inner-split loss,
    the L2 strength and the temperatures."""
    temperature = getattr(model, "temperature", None)
    return {
        "fit_pairs": int(fit_pairs),
        "val_pairs": int(val_pairs),
        "epochs_run": int(epochs_run),
        "best_epoch": int(best.best_epoch) if val_pairs else int(epochs_run),
        "val_loss": float(best.best) if val_pairs and math.isfinite(best.best) else None,
        "l2": float(l2),
        "temperature": [] if temperature is None else [float(t) for t in temperature],
    }
