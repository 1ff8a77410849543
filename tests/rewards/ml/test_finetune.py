"""Encoder fine-tuning (LoRA and last layers) on tiny random CLIP/SigLIP models: CPU smoke tests, GPU learning."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from peft import PeftModel
from PIL import Image
from torch import nn

from rewards.ml.data import A_WINS, B_WINS, TIE
from rewards.ml.encoders import EncoderError, load_encoder
from rewards.ml.finetune.common import add_lora, merged, trainable
from rewards.ml.finetune.config import FinetuneConfig
from rewards.ml.finetune.trainer import FinetunedRewardModel, ImagePairs, load_finetuned, train
from rewards.ml.model import BTRewardModel, load_reward_model
from rewards.ml.progress import ConfigError, Progress, TrainingCancelled
from tests.rewards.ml.tiny_models import CLIP_DIM, save_tiny_bert, save_tiny_clip, save_tiny_siglip

pytestmark: list[pytest.MarkDecorator] = []  # no database needed

# A few steps on CPU: 24 training images, ~90 pairs, batch 16.
FAST: dict[str, Any] = {"device": "cpu", "dtype": "float32", "lr": 1e-3}
PROMPTS = ("a photo", "a drawing", "a painting")
# Everything after the last vision layer on the way to a CLIP image embedding.
CLIP_TOP = ("vision_model.post_layernorm.", "visual_projection.")


def make_pairs(n_images: int, seed: int, *, prompts: bool = True) -> ImagePairs:
    """Noisy grey images of random brightness; in every pair the brighter image wins."""
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(np.clip(level + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8))
        for level in rng.uniform(30, 225, n_images)
    ]
    brightness = np.array([np.asarray(image, dtype=np.float64).mean() for image in images])
    a = rng.integers(0, n_images, 4 * n_images)
    b = rng.integers(0, n_images, 4 * n_images)
    a, b = a[a != b], b[a != b]
    return ImagePairs(
        images=images,
        prompts=[PROMPTS[i % len(PROMPTS)] for i in range(n_images)] if prompts else None,
        a=a,
        b=b,
        outcome=np.where(brightness[a] > brightness[b], A_WINS, B_WINS),
        weight=np.ones(len(a)),
    )


def brightness_order_agreement(model: FinetunedRewardModel, pairs: ImagePairs) -> float:
    """Share of ``pairs`` where the model's rewards order the two images as their labels do."""
    reward = model.score_images(pairs.images, pairs.prompts)
    right = (reward[pairs.a] > reward[pairs.b]) == (pairs.outcome == A_WINS)
    return float(right.mean())


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


# --- Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models are all thread synchronisation: one thread is much faster on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("finetune") / "clip")


@pytest.fixture(scope="module")
def data() -> tuple[ImagePairs, ImagePairs]:
    return make_pairs(24, seed=0), make_pairs(16, seed=1)


@pytest.fixture(scope="module")
def base_state(clip_dir: Path) -> dict[str, torch.Tensor]:
    return clone_state(load_encoder(clip_dir).model)


@dataclass
class Run:
    model: FinetunedRewardModel
    reports: list[Progress]
    state: dict[str, torch.Tensor]  # the encoder's state dict right after training (LoRA unmerged)
    unmerged: nn.Module  # a copy of the encoder model right after training
    embeddings: np.ndarray  # fine-tuned embeddings of the training images, before any merge


@pytest.fixture(scope="module")
def runs(clip_dir: Path, data: tuple[ImagePairs, ImagePairs]) -> dict[str, Run]:
    """One short run per method, training only the last of the tiny CLIP's two vision layers."""
    out = {}
    for method in ("lora", "last_layers"):
        reports: list[Progress] = []
        config = FinetuneConfig(method=method, train_layers=1, lora_layers=1, epochs=2, **FAST)
        model = train(config, data[0], encoder_path=clip_dir, holdout=data[1], progress=reports.append)
        out[method] = Run(
            model=model,
            reports=reports,
            state=clone_state(model.encoder.model),
            unmerged=copy.deepcopy(model.encoder.model),
            embeddings=model.embed_images(data[0].images),
        )
    return out


# --- Config -----------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip() -> None:
    config = FinetuneConfig()
    assert (config.method, config.train_layers, config.lora_layers) == ("lora", 2, None)
    assert (config.lora_rank, config.lora_alpha) == (8, 16.0)
    assert config.lora_targets is None  # picked per encoder family
    assert config.resolved_lora_targets("image") == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert config.resolved_lora_targets("text") == ["query", "key", "value", "dense"]
    assert (config.batch_size, config.lr, config.head_lr) == (16, 1e-4, 1e-3)
    assert (config.ties, config.both_bad, config.device, config.dtype) == (
        "davidson",
        "drop",
        "cuda",
        "float32",
    )
    config.validate()
    data = json.loads(json.dumps(config.to_dict()))
    assert FinetuneConfig.from_dict(data) == config
    changed = FinetuneConfig.from_dict({"method": "last_layers", "lora_targets": ["fc1"], "dtype": "float16"})
    assert (changed.method, changed.lora_targets, changed.dtype) == ("last_layers", ["fc1"], "float16")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "full", "must be one of 'last_layers', 'lora', got 'full'"),
        ("train_layers", 0, "must be between 1 and 1000, got 0"),
        ("lora_layers", 0, "must be between 1 and 1000, got 0"),
        ("lora_rank", 2.5, "must be an integer, got 2.5"),
        ("lora_alpha", 0.0, "must be greater than 0.0, got 0.0"),
        ("lora_targets", [], "must be a non-empty list of names or null, got []"),
        ("lora_targets", "q_proj", "must be a non-empty list of names or null, got 'q_proj'"),
        (
            "lora_targets",
            ["q_proj", "qkv"],
            "must be one of 'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', ",
        ),
        ("lora_targets", ["q_proj", "q_proj"], "names must not repeat, got ['q_proj', 'q_proj']"),
        ("batch_size", 0, "must be between 1 and 1000000, got 0"),
        ("lr", 0.0, "must be greater than 0.0, got 0.0"),
        ("head_lr", math.nan, "must be a finite number, got nan"),
        ("max_grad_norm", -1.0, "must be at least 0.0, got -1.0"),
        ("ties", "bt", "must be one of 'davidson', 'rao_kupper', 'none', got 'bt'"),
        ("grad_checkpointing", 1, "must be true or false, got 1"),
        ("device", "gpu", "must be 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
        ("dtype", "float64", "must be one of 'float32', 'bfloat16', 'float16', got 'float64'"),
    ],
)
def test_config_validation(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        FinetuneConfig.from_dict({field: value})
    assert error.value.field == field
    assert error.value.message.startswith(message)


def test_config_rejects_unknown_keys_and_both_bad_ties_without_a_tie_model() -> None:
    with pytest.raises(ConfigError, match="unknown config keys: hidden, rank") as error:
        FinetuneConfig.from_dict({"rank": 4, "hidden": 0, "lora_rank": 4})
    assert error.value.field == "hidden, rank"
    with pytest.raises(ConfigError) as error:
        FinetuneConfig.from_dict({"ties": "none", "both_bad": "tie"})
    assert error.value.field == "both_bad"


# --- LoRA -------------------------------------------------------------------------------------------


def test_lora_at_step_zero_is_exactly_the_base_model(
    clip_dir: Path, data: tuple[ImagePairs, ImagePairs]
) -> None:
    images = data[0].images
    base = load_encoder(clip_dir)
    encoder = load_encoder(clip_dir)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    peft_model = add_lora(
        encoder.model,
        layer_prefix="vision_model.encoder.layers",
        n_layers=2,
        layers=None,
        targets=targets,
        rank=4,
        alpha=8.0,
        dropout=0.0,
    )
    assert isinstance(peft_model, PeftModel)
    encoder.model = peft_model
    names, _ = trainable(peft_model)
    assert len(names) == 24  # A and B of 6 linears in 2 vision layers
    assert all(name.startswith("vision_model.encoder.layers.") for name in names)
    assert all(".lora_A." in name or ".lora_B." in name for name in names)
    np.testing.assert_array_equal(encoder.embed_images(images), base.embed_images(images))

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    adapted = encoder.embed_images(images)
    assert np.abs(adapted - base.embed_images(images)).max() > 1e-2
    plain, adapter = merged(peft_model)
    assert adapter is not None and not isinstance(plain, PeftModel)
    assert list(plain.state_dict()) == list(base.model.state_dict())
    encoder.model = plain
    np.testing.assert_allclose(encoder.embed_images(images), adapted, atol=1e-5)


# --- Training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "last_layers"])
def test_training_reports_progress_and_finite_losses(
    runs: dict[str, Run], data: tuple[ImagePairs, ImagePairs], method: str
) -> None:
    run = runs[method]
    steps = 2 * math.ceil(data[0].num_pairs / 16)
    assert run.reports[0].step == 1
    assert [(r.step, r.total_steps, r.epochs) for r in run.reports][-1] == (steps, steps, 2)
    assert all(math.isfinite(r.loss) for r in run.reports)
    epoch_ends = [r for r in run.reports if r.metrics]
    assert [r.epoch for r in epoch_ends] == [1, 2]
    assert all(r.metrics["holdout_pairs"] == data[1].num_pairs for r in epoch_ends)
    assert 0.0 <= epoch_ends[-1].metrics["holdout_accuracy"] <= 1.0
    assert len(run.model.curves) == len(run.reports)
    assert run.model.prompt_conditioned
    assert run.model.head.dim == CLIP_DIM


def test_lora_trains_only_its_adapters(runs: dict[str, Run], base_state: dict[str, torch.Tensor]) -> None:
    run = runs["lora"]
    layer = "vision_model.encoder.layers.1.self_attn"
    # peft's names: <linear>.lora_A.default.weight / lora_B; the wrapped linear becomes base_layer.
    adapters = [
        f"{layer}.{p}_proj.lora_{m}.default.weight" for p in ("q", "k", "v", "out") for m in ("A", "B")
    ]
    assert sorted(run.model.trained_parameters) == sorted(adapters)
    state = {name.removeprefix("base_model.model."): value for name, value in run.state.items()}
    assert set(state) == {
        name.replace("_proj.", "_proj.base_layer.")
        if name.startswith(tuple(f"{layer}.{p}_proj." for p in ("q", "k", "v", "out")))
        else name
        for name in base_state
    } | set(adapters)
    for name, value in state.items():
        if name in adapters:
            continue
        assert torch.equal(value, base_state[name.replace(".base_layer.", ".")]), f"{name} changed"
    for name in adapters:
        if ".lora_B." in name:
            assert state[name].abs().max() > 0  # moved away from its zero start


def test_last_layers_trains_the_last_layer_and_what_follows(
    runs: dict[str, Run], base_state: dict[str, torch.Tensor]
) -> None:
    run = runs["last_layers"]
    intended = ("vision_model.encoder.layers.1.", *CLIP_TOP)
    assert sorted(run.state) == sorted(base_state)
    assert run.model.trained_parameters == [
        name for name, _ in run.model.encoder.model.named_parameters() if name.startswith(intended)
    ]
    changed = {name for name in base_state if not torch.equal(run.state[name], base_state[name])}
    assert changed <= set(run.model.trained_parameters)
    # Every weight matrix of the trained part moved (a bias may see an exactly zero gradient).
    weights = {n for n in run.model.trained_parameters if n.endswith(".weight")}
    assert weights <= changed
    assert (
        len(weights) == 10
    )  # layer 1's q, k, v, out, fc1, fc2 and 2 layer norms; post-layernorm; projection


@pytest.mark.parametrize("method", ["lora", "last_layers"])
def test_save_pretrained_writes_a_plain_encoder_and_a_bt_head(
    clip_dir: Path,
    runs: dict[str, Run],
    data: tuple[ImagePairs, ImagePairs],
    base_state: dict[str, torch.Tensor],
    tmp_path: Path,
    method: str,
) -> None:
    run = runs[method]
    images, prompts = data[1].images, data[1].prompts
    assert prompts is not None
    scores = run.model.score_images(images, prompts)
    run.model.save_pretrained(tmp_path)

    expected_files = ["config.json", "encoder", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        expected_files + (["adapter"] if method == "lora" else [])
    )
    if method == "lora":
        # The adapter loads with plain peft onto the base encoder and gives the fine-tuned encoder.
        from transformers import CLIPModel

        base_model = CLIPModel.from_pretrained(str(clip_dir))
        tuned = PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).merge_and_unload()
        plain = load_encoder(clip_dir)
        plain.model = tuned.eval()
        np.testing.assert_allclose(plain.embed_images(data[0].images), run.embeddings, atol=1e-5)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "encoder").iterdir()
    }
    encoder = load_encoder(tmp_path / "encoder")
    assert list(encoder.model.state_dict()) == list(base_state)  # no LoRA keys left
    np.testing.assert_allclose(encoder.embed_images(data[0].images), run.embeddings, atol=1e-5)
    assert (
        np.abs(run.embeddings - load_encoder(run.model.base["path"]).embed_images(data[0].images)).max()
        > 1e-4
    )

    head = load_reward_model(tmp_path)
    assert isinstance(head, BTRewardModel)
    assert (head.kind, head.dim, head.k, head.prompt_conditioned) == ("bt", CLIP_DIM, 1, True)
    assert head.config["lr"] == 1e-3 and head.config["hidden"] == 0
    assert head.extra["finetune"] == run.model.config.to_dict()
    assert head.extra["encoder"]["dir"] == "encoder"
    assert head.extra["encoder"]["fingerprint"] == encoder.info.fingerprint
    assert head.extra["encoder"]["base"]["fingerprint"] != encoder.info.fingerprint
    assert head.extra["trained_parameters"] == run.model.trained_parameters
    x = encoder.embed_images(images)[:, None, :]
    np.testing.assert_allclose(head.score(x, None, encoder.embed_texts(prompts)).reward, scores, atol=1e-4)

    again = load_finetuned(tmp_path)
    assert again.config == run.model.config
    np.testing.assert_allclose(again.score_images(images, prompts), scores, atol=1e-4)
    with pytest.raises(ValueError, match="prompt-conditioned: pass one prompt per image"):
        again.score_images(images)


def test_runs_are_seeded(clip_dir: Path, data: tuple[ImagePairs, ImagePairs]) -> None:
    config = FinetuneConfig(epochs=1, **FAST)
    first, second = (train(config, data[0], encoder_path=clip_dir) for _ in range(2))
    for one, two in [(first.head, second.head), (first.encoder.model, second.encoder.model)]:
        for (name, p), (_, q) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
            assert torch.equal(p, q), name
    other = train(FinetuneConfig(seed=1, epochs=1, **FAST), data[0], encoder_path=clip_dir)
    assert not torch.equal(other.head.scorer.out_weight, first.head.scorer.out_weight)


def test_unprompted_data_and_ties(clip_dir: Path) -> None:
    pairs = make_pairs(12, seed=3, prompts=False)
    pairs.outcome[:5] = TIE
    reports: list[Progress] = []
    config = FinetuneConfig(method="last_layers", ties="rao_kupper", epochs=1, **FAST)
    model = train(config, pairs, encoder_path=clip_dir, progress=reports.append)
    assert not model.prompt_conditioned
    assert model.score_images(pairs.images).shape == (12,)
    assert all(math.isfinite(r.loss) for r in reports)
    assert reports[-1].metrics == {}  # no holdout


@pytest.mark.parametrize(("dtype", "checkpointing"), [("bfloat16", True), ("float16", False)])
def test_mixed_precision_on_cpu(
    clip_dir: Path, data: tuple[ImagePairs, ImagePairs], dtype: str, checkpointing: bool
) -> None:
    reports: list[Progress] = []
    config = FinetuneConfig(device="cpu", dtype=dtype, grad_checkpointing=checkpointing, epochs=1, lr=1e-3)
    model = train(config, data[0], encoder_path=clip_dir, progress=reports.append)
    assert all(math.isfinite(r.loss) for r in reports)
    assert not model.encoder.model.is_activation_checkpointing
    assert all(p.dtype == torch.float32 for p in model.encoder.model.parameters())
    assert model.embed_images(data[0].images[:2]).dtype == np.float32


def test_siglip_last_layers_include_its_pooling_head(
    tmp_path: Path, data: tuple[ImagePairs, ImagePairs]
) -> None:
    path = save_tiny_siglip(tmp_path / "siglip")
    before = clone_state(load_encoder(path).model)
    config = FinetuneConfig(method="last_layers", train_layers=1, epochs=1, **FAST)
    model = train(config, data[0], encoder_path=path)
    trained = model.trained_parameters
    assert {n.split(".")[1] for n in trained} == {"encoder", "post_layernorm", "head"}
    assert all(
        n.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm.", "vision_model.head."))
        for n in trained
    )
    after = model.encoder.model.state_dict()
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    assert changed and changed <= set(trained)
    lora = train(FinetuneConfig(epochs=1, **FAST), data[0], encoder_path=path)
    assert len(lora.trained_parameters) == 2 * 4 * 2  # 2 layers x q/k/v/out x A/B


# --- Errors -----------------------------------------------------------------------------------------


def test_cancellation_propagates(clip_dir: Path, data: tuple[ImagePairs, ImagePairs]) -> None:
    seen: list[int] = []

    def cancel(report: Progress) -> None:
        seen.append(report.step)
        raise TrainingCancelled("stop")

    with pytest.raises(TrainingCancelled, match="stop"):
        train(
            FinetuneConfig(grad_checkpointing=True, **FAST), data[0], encoder_path=clip_dir, progress=cancel
        )
    assert seen == [1]


def test_refuses_bad_input(tmp_path: Path, clip_dir: Path, data: tuple[ImagePairs, ImagePairs]) -> None:
    pairs = data[0]
    with pytest.raises(ConfigError) as error:
        train(FinetuneConfig(method="last_layers", train_layers=3, **FAST), pairs, encoder_path=clip_dir)
    assert (error.value.field, error.value.message) == (
        "train_layers",
        "the encoder has 2 vision layers, got 3",
    )
    with pytest.raises(ConfigError) as error:
        train(FinetuneConfig(lora_layers=5, **FAST), pairs, encoder_path=clip_dir)
    assert (error.value.field, error.value.message) == (
        "lora_layers",
        "the encoder has 2 vision layers, got 5",
    )
    with pytest.raises(ConfigError, match=r"lr: must be greater than 0\.0"):
        train(FinetuneConfig(**{**FAST, "lr": 0.0}), pairs, encoder_path=clip_dir)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but CUDA is not available"):
            train(FinetuneConfig(), pairs, encoder_path=clip_dir)

    ties = make_pairs(6, seed=4)
    ties.outcome[:] = TIE
    with pytest.raises(ValueError, match="no pairs to train on"):
        train(FinetuneConfig(ties="none", **FAST), ties, encoder_path=clip_dir)
    with pytest.raises(ValueError, match="the holdout pairs need them too"):
        train(FinetuneConfig(**FAST), pairs, encoder_path=clip_dir, holdout=make_pairs(4, 5, prompts=False))
    with pytest.raises(EncoderError, match="does not exist"):
        train(FinetuneConfig(**FAST), pairs, encoder_path=tmp_path / "nope")
    bert = save_tiny_bert(tmp_path / "bert")
    with pytest.raises(EncoderError, match="a text encoder has no image tower to fine-tune"):
        train(FinetuneConfig(**FAST), pairs, encoder_path=bert)

    images, prompts = pairs.images[:3], ["p"] * 3
    with pytest.raises(ValueError, match=r"prompts must have one entry per image \(3\), got 2"):
        ImagePairs(images, prompts[:2], np.array([0]), np.array([1]), np.array([A_WINS]), np.ones(1))
    with pytest.raises(ValueError, match="pair indices out of range of the 3 images"):
        ImagePairs(images, prompts, np.array([0]), np.array([3]), np.array([A_WINS]), np.ones(1))
    with pytest.raises(ValueError, match=r"outcome must have shape \(2,\)"):
        ImagePairs(images, prompts, np.array([0, 1]), np.array([1, 2]), np.array([A_WINS]), np.ones(2))


# --- Learning ---------------------------------------------------------------------------------------


def test_lora_learns_brighter_wins_on_cpu(clip_dir: Path, data: tuple[ImagePairs, ImagePairs]) -> None:
    config = FinetuneConfig(epochs=4, **FAST)
    model = train(config, data[0], encoder_path=clip_dir, holdout=data[1])
    assert model.curves[-1]["holdout_accuracy"] >= 0.8
    assert brightness_order_agreement(model, data[1]) >= 0.8


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_learns_brighter_wins_on_cuda(clip_dir: Path, dtype: str, tmp_path: Path) -> None:
    train_pairs, holdout = make_pairs(64, seed=10), make_pairs(32, seed=11)
    reports: list[Progress] = []
    config = FinetuneConfig(
        device="cuda", dtype=dtype, epochs=8, lr=1e-3, grad_checkpointing=dtype == "float16"
    )
    model = train(config, train_pairs, encoder_path=clip_dir, holdout=holdout, progress=reports.append)
    assert reports[-1].step == reports[-1].total_steps <= 8 * math.ceil(train_pairs.num_pairs / 16)
    assert all(math.isfinite(r.loss) for r in reports)
    assert next(model.encoder.model.parameters()).device.type == "cuda"
    model.save_pretrained(tmp_path / "m")
    adapter = safetensors.torch.load_file(str(tmp_path / "m" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 4 and all(v.abs().max() > 0 for v in lora_b)
    assert reports[-1].metrics["holdout_accuracy"] >= 0.8
    assert brightness_order_agreement(model, holdout) >= 0.8
