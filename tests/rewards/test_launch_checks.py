"""The launch check refuses exactly what the worker would (the same hold-out split, the same
minimum training and held-out counts), a refused launch changes no row, and a version with no
held-out evidence is never promoted."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings

from annotate.errors import Forbidden, Invalid
from annotate.models import Judgment
from rewards import services
from rewards.models import RewardConfig, RewardModelVersion, RewardTrainingJob
from tests.factories import rows_digest
from tests.rewards.helpers import brighter, image_project, simulate
from tests.rewards.ml.tiny_models import save_tiny_clip

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: Any) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def _held_out(project_id: int, comparison_id: int, share: float) -> bool:
    # The documented rule, written out again here: a stable blake2b hash of (project, comparison).
    digest = hashlib.blake2b(f"{project_id}:{comparison_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def _split(project: Any, share: float = 0.2) -> tuple[int, int]:
    cids = list(Judgment.objects.filter(project=project).values_list("comparison_id", flat=True))
    held = sum(_held_out(project.id, c, share) for c in cids)
    return len(cids) - held, held


def _table_counts() -> dict[str, int]:
    out = {}
    with connection.cursor() as cur:
        for table in sorted(connection.introspection.table_names()):
            cur.execute(f'SELECT count(*) FROM "{table}"')
            out[table] = cur.fetchone()[0]
    return out


def test_launch_refuses_exactly_what_the_worker_would(
    make_project: Any, manager: Any, annotator: Any, clip_dir: Path
) -> None:
    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=1, per_prompt=9, pairs_per_prompt=36
    )
    last_refused: tuple[int, int] | None = None
    while True:
        assert simulate(project, annotator, brighter, limit=1) == 1
        train, held = _split(project)
        if train + held < 10:
            continue
        before = _table_counts()
        try:
            job = services.reward_job_create(
                project=project, actor=manager, encoder_path=str(clip_dir), dispatch=False
            )
        except Invalid as exc:
            assert train < 10 or held < 1
            assert exc.code == "too_few_pairs" and exc.status == 400
            assert exc.message == (
                f"too few judged pairs to train on: holding out 20% of the comparisons leaves {train} "
                f"training and {held} held-out pairs of {train + held}; at least 10 training and 1 "
                "held-out pairs are needed (judge more comparisons)"
            )
            assert exc.details == {
                "pairs": train + held,
                "train_pairs": train,
                "holdout_pairs": held,
                "min_train_pairs": 10,
                "min_holdout_pairs": 1,
            }
            assert _table_counts() == before
            last_refused = (train, held)
            continue
        break
    # Accepted at the first state with 10 training and 1 held-out pair, one judgment after a refusal.
    assert train >= 10 and held >= 1 and (train == 10 or held == 1)
    assert last_refused is not None and last_refused in ((train - 1, held), (train, held - 1))
    # ... and the worker agrees: it trains on exactly those pairs.
    done = services.reward_job_run(job_id=job.id)
    assert done.status == "succeeded", done.error
    version = RewardModelVersion.objects.get(job=job)
    assert (version.metrics["train_pairs"], version.metrics["holdout_pairs"]) == (train, held)
    assert version.metrics["holdout_accuracy"] is not None

    # A judgment gone between launch and run (undone, deleted) fails the worker with the launch's
    # own message, before any embedding.
    again = services.reward_job_create(
        project=project, actor=manager, encoder_path=str(clip_dir), dispatch=False
    )
    held_ids = [
        j.id for j in Judgment.objects.filter(project=project) if _held_out(project.id, j.comparison_id, 0.2)
    ]
    Judgment.objects.filter(id__in=held_ids).delete()
    failed = services.reward_job_run(job_id=again.id)
    assert failed.status == "failed"
    assert failed.error == (
        f"too few judged pairs to train on: holding out 20% of the comparisons leaves {train} "
        f"training and 0 held-out pairs of {train}; at least 10 training and 1 held-out pairs are "
        "needed (judge more comparisons)"
    )


def test_held_out_minimum_is_a_setting(
    make_project: Any, manager: Any, annotator: Any, clip_dir: Path
) -> None:
    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=1, per_prompt=10, pairs_per_prompt=45
    )
    simulate(project, annotator, brighter)
    train, held = _split(project, 0.3)
    assert train >= 10 and held >= 1
    with (
        override_settings(RL_REWARD_MIN_HOLDOUT_PAIRS=held + 1),
        pytest.raises(Invalid, match=f"leaves {train} training and {held} held-out pairs of 45"),
    ):
        services.reward_job_create(
            project=project, actor=manager, encoder_path=str(clip_dir), holdout=0.3, dispatch=False
        )
    with override_settings(RL_REWARD_MIN_HOLDOUT_PAIRS=held):
        job = services.reward_job_create(
            project=project, actor=manager, encoder_path=str(clip_dir), holdout=0.3, dispatch=False
        )
    assert job.holdout == 0.3


def test_a_refused_launch_changes_no_row(
    make_project: Any, manager: Any, annotator: Any, clip_dir: Path, tmp_path: Path
) -> None:
    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=1, per_prompt=6, pairs_per_prompt=15
    )
    simulate(project, annotator, brighter, limit=5)
    assert not RewardConfig.objects.filter(project=project).exists()
    refusals: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (Invalid, "unknown reward model kind 'svm'", {"kind": "svm"}),
        (Invalid, "hyperparameter lr", {"hyperparameters": {"lr": -1}}),
        (Invalid, "does not exist", {"encoder_path": str(tmp_path / "nope")}),
        (Invalid, r"too few judged pairs to train on: 5 \(at least 10 needed\)", {}),
    ]
    for error, match, kwargs in refusals:
        before, digest = _table_counts(), rows_digest()
        kwargs = {"encoder_path": str(clip_dir), **kwargs}
        with pytest.raises(error, match=match):
            services.reward_job_create(project=project, actor=manager, dispatch=False, **kwargs)
        assert _table_counts() == before and rows_digest() == digest, match
    # A non-manager is refused before anything else, with enough pairs to train on.
    simulate(project, annotator, brighter)
    before, digest = _table_counts(), rows_digest()
    with pytest.raises(Forbidden):
        services.reward_job_create(
            project=project, actor=annotator, encoder_path=str(clip_dir), dispatch=False
        )
    assert _table_counts() == before and rows_digest() == digest
    assert before["rewards_encoder"] == 0 and before["rewards_rewardconfig"] == 0
    assert RewardTrainingJob.objects.count() == 0


def test_a_version_without_held_out_figures_is_never_promoted(
    make_project: Any, manager: Any, annotator: Any, clip_dir: Path
) -> None:
    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=1, per_prompt=10, pairs_per_prompt=45
    )
    simulate(project, annotator, brighter)
    job = services.reward_job_create(
        project=project,
        actor=manager,
        encoder_path=str(clip_dir),
        hyperparameters={"epochs": 2},
        dispatch=False,
    )
    job = services.reward_job_run(job_id=job.id)
    v1 = RewardModelVersion.objects.get(job=job)
    assert v1.is_active

    def blind(number: int) -> RewardModelVersion:
        metrics = {**v1.metrics, "holdout": None, "holdout_pairs": 0, "holdout_accuracy": None, "ece": None}
        # Its own (never run) job: a version belongs to one job.
        own = services.reward_job_create(
            project=project, actor=manager, encoder_path=str(clip_dir), dispatch=False
        )
        return RewardModelVersion.objects.create(
            project=project,
            number=number,
            job=own,
            kind="bt",
            encoder=v1.encoder,
            snapshot=v1.snapshot,
            path=v1.path,
            metrics=metrics,
        )

    reason = (
        "no held-out figures: it was evaluated on no held-out pairs, so nothing shows it is any good "
        "(a manager can still activate it by hand)"
    )
    # Beside an active model ...
    v2 = services.version_decide(version=blind(2))
    v1.refresh_from_db()
    assert (v2.is_active, v1.is_active) == (False, True)
    assert v2.decision == {
        "promoted": False,
        "reason": reason,
        "holdout_pairs": 0,
        "challenger": {"version": 2, "accuracy": None, "log_loss": None, "ece": None, "pairs": None},
        "champion_version": 1,
    }
    # ... and with none active: no evidence is no promotion either.
    RewardModelVersion.objects.filter(id=v1.id).update(is_active=False)
    v3 = services.version_decide(version=blind(3))
    assert not v3.is_active and v3.decision["promoted"] is False and v3.decision["reason"] == reason
    assert "champion_version" not in v3.decision
    assert RewardModelVersion.objects.filter(project=project, is_active=True).count() == 0
    v3.refresh_from_db()
    assert v3.decision["reason"] == reason  # stored
