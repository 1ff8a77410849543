"""Our exports read by the real clients: datasets.load_dataset (json and parquet) and one training
step of TRL's RewardTrainer and DPOTrainer on a tiny offline model, from a project's own judgments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest

from annotate import exports, services
from tests.ml_helpers import run_dpo_trainer_step, run_reward_trainer_step

pytestmark = pytest.mark.django_db


@pytest.fixture
def judged(make_user: Any, make_project: Any, manager: Any) -> Any:
    """Eight text comparisons, each judged by two annotators (the second disagrees on every third)."""
    users = [make_user("c1"), make_user("c2")]
    project = make_project("clients", annotators=tuple(users), overlap=2)
    items = []
    for i in range(8):
        items += [
            {
                "prompt": f"Question {i}: what is {i} + {i}? ",
                "text": f"It is {2 * i}.",
                "generator": "g",
                "generator_version": "good",
            },
            {
                "prompt": f"Question {i}: what is {i} + {i}? ",
                "text": "No idea, sorry.",
                "generator": "g",
                "generator_version": "bad",
            }
            if i == 0
            else {
                "prompt": f"Question {i}: what is {i} + {i}? ",
                "text": f"Maybe {i}?",
                "generator": "g",
                "generator_version": "bad",
            },
        ]
    ids = [r.sample.id for r in services.sample_create_texts(project=project, actor=manager, items=items)]
    services.comparisons_create(
        project=project, actor=manager, specs=[{"samples": [ids[2 * i], ids[2 * i + 1]]} for i in range(8)]
    )
    for n, user in enumerate(users):
        for k in range(8):
            (lease,) = services.assignment_next(project=project, annotator=user)
            good = min(lease.display_order)  # the first-created sample of each pair is the right answer
            pick_good = not (n == 1 and k % 3 == 0)
            side = "left" if (lease.display_order[0] == good) == pick_good else "right"
            services.judgment_submit(project=project, annotator=user, assignment_id=lease.id, choice=side)
    return project


def _write(project: Any, path: Path, **kw: Any) -> Path:
    with path.open("wb") as fh:
        exports.write(project=project, spec=exports.ExportSpec(**kw), out=fh)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_load_dataset_reads_every_schema(judged: Any, tmp_path: Path, fmt: str) -> None:
    loader = "json" if fmt == "jsonl" else "parquet"
    expected = {
        ("trl", "none"): (16, ["prompt", "chosen", "rejected"]),
        ("pickapic", "soft"): (8, ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1"]),
        ("ranking", "majority"): (8, ["prompt", "samples", "sample_ids", "ranking"]),
        ("raw", "none"): (16, ["judgment_id", "annotator", "displayed_order", "time_spent_ms"]),
    }
    for (schema, aggregate), (rows, columns) in expected.items():
        path = _write(judged, tmp_path / f"{schema}.{fmt}", schema=schema, format=fmt, aggregate=aggregate)
        ds = datasets.load_dataset(
            loader, data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
        )
        assert ds.num_rows == rows, schema
        assert set(columns) <= set(ds.column_names), (schema, ds.column_names)
    trl = datasets.load_dataset(
        loader, data_files=str(tmp_path / f"trl.{fmt}"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert trl[0] == {
        "prompt": "Question 0: what is 0 + 0? ",
        "chosen": "It is 0.",
        "rejected": "No idea, sorry.",
    }


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_trl_trainers_take_one_step_on_our_export(judged: Any, tmp_path: Path, fmt: str) -> None:
    path = _write(judged, tmp_path / f"trl.{fmt}", schema="trl", format=fmt, aggregate="none")
    reward = run_reward_trainer_step(path, fmt, tmp_path / "reward")
    assert reward.rows == 16
    dpo = run_dpo_trainer_step(path, fmt, tmp_path / "dpo")
    assert dpo.rows == 16
    assert dpo.loss == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step one: loss = log 2
