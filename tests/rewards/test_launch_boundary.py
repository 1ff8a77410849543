"""Reward-job launch at the boundary: server paths are the staff's to name, an unreadable path is
a 400 (not a 500), and a launch with the broker down is a 503 that leaves no job behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from annotate import services as annotate_services
from annotate.models import ProjectMember
from rewards.models import RewardTrainingJob
from tests.factories import broker_unreachable, client_for, rows_digest
from tests.rewards.helpers import brighter, image_project, simulate
from tests.rewards.ml.tiny_models import save_tiny_clip

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: Any) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def judged(make_project: Any, manager: Any, annotator: Any) -> Any:
    project = image_project(
        make_project, manager, annotators=(annotator,), prompts=2, per_prompt=8, pairs_per_prompt=20
    )
    simulate(project, annotator, brighter, limit=40)
    return project


def test_non_staff_managers_name_only_registered_encoders(
    judged: Any, manager: Any, make_user: Any, clip_dir: Path, tmp_path: Path
) -> None:
    boss = make_user("boss")  # a manager of the project, not staff
    annotate_services.project_member_set(
        project=judged, actor=manager, user=boss, role=ProjectMember.Role.MANAGER
    )
    c = client_for(boss)
    client_for(manager)
    url = f"/api/projects/{judged.slug}/reward-jobs/"
    (tmp_path / "not-a-model").mkdir()
    before = rows_digest()
    bodies = []
    # An existing model, an existing non-model directory, a missing one, one too long for the
    # filesystem: the same refusal, so the errors reveal nothing about the server's disk.
    for path in (str(clip_dir), str(tmp_path / "not-a-model"), "/nonexistent/x", "/" + "a" * 300):
        r = c.post(url, {"encoder": path, "hyperparameters": {"epochs": 1}}, format="json")
        assert r.status_code == 403, r.content
        body = r.json()
        bodies.append(body)
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["error"]["code"] == "bad_encoder"
    assert rows_digest() == before
    # Staff register the directory; from then on the manager may use it.
    staff = client_for(manager)
    r = staff.post(url, {"encoder": "/" + "a" * 300}, format="json")
    assert r.status_code == 400 and "cannot be read" in r.json()["error"]["message"]
    r = staff.post(url, {"encoder": str(clip_dir), "hyperparameters": {"epochs": 1}}, format="json")
    assert r.status_code == 202, r.content
    r = c.post(url, {"encoder": str(clip_dir), "hyperparameters": {"epochs": 1}}, format="json")
    assert r.status_code == 202, r.content


@pytest.mark.django_db(transaction=True)  # the job is queued on commit
def test_launch_with_the_broker_down_leaves_no_job(judged: Any, manager: Any, clip_dir: Path) -> None:
    c = client_for(manager)
    with broker_unreachable():
        before = rows_digest()
        r = c.post(
            f"/api/projects/{judged.slug}/reward-jobs/",
            {"encoder": str(clip_dir), "hyperparameters": {"epochs": 1}},
            format="json",
        )
        assert r.status_code == 503, r.content
        assert r["Retry-After"] == "5"
        assert r.json()["error"]["code"] == "unavailable"
        # The job and the snapshot it recorded are gone: nothing waits for ever in "queued".
        # (The encoder registration stays: it describes a directory, not this request.)
        after = rows_digest()
        assert {t: v for t, v in after.items() if v != before[t]} == {}
        assert RewardTrainingJob.objects.count() == 0
