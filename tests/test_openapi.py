"""The OpenAPI contract against the live server: schemathesis generates requests for every
operation of /api/schema/ (valid and invalid ones) as a manager and as an annotator, with real
token authentication, and checks each response: no 5xx, a documented status code and content
type, a body that matches the documented schema.

Path parameters mostly name real rows (a dictionary with probability < 1), so requests get past
the 404 and reach the views; the rest are random. Downloads (export, snapshot file) are binary:
for them the status and the content type are checked, as the schema declares no body shape.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from typing import Any

import pytest
import schemathesis
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from annotate import exports, services
from annotate.models import ProjectMember

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Examples per operation, role and mode (valid / invalid inputs): 42 operations x 2 x 2 x 12.
MAX_EXAMPLES = 12


@pytest.fixture
def world(live_server: Any, transactional_db: None) -> dict[str, Any]:
    """A pairwise text project with judged and open comparisons, a built snapshot, a reward job
    and its version with scores; a manager (not staff: a member with add_project) and an
    annotator, each with an API token."""
    from rewards.models import Encoder, RewardModelVersion, RewardTrainingJob, SampleScore

    users = get_user_model().objects
    manager = users.create_user("oa-manager", password="pw-oa-manager")
    manager.user_permissions.add(Permission.objects.get(codename="add_project"))
    manager = users.get(pk=manager.pk)  # drop the permission cache
    annotator = users.create_user("oa-annotator", password="pw-oa-annotator")
    project = services.project_create(
        creator=manager, slug="p1", name="P1", aspects=[{"key": "alignment"}], overlap=2
    )
    services.project_member_set(
        project=project, actor=manager, user=annotator, role=ProjectMember.Role.ANNOTATOR
    )
    items = [
        {"prompt": f"prompt {i}", "text": f"answer {side}{i}", "generator": "g", "generator_version": side}
        for i in range(4)
        for side in ("a", "b")
    ]
    ids = [r.sample.id for r in services.sample_create_texts(project=project, actor=manager, items=items)]
    services.comparisons_create(
        project=project, actor=manager, specs=[{"samples": ids[2 * i : 2 * i + 2]} for i in range(4)]
    )
    (lease,) = services.assignment_next(project=project, annotator=annotator, n=1)
    services.judgment_submit(
        project=project,
        annotator=annotator,
        assignment_id=lease.id,
        choice="left",
        aspects={"alignment": "tie"},
    )
    services.assignment_next(project=project, annotator=annotator, n=1)  # one open lease left
    snap = services.snapshot_create(
        project=project,
        actor=manager,
        spec=exports.spec_from_params({"schema": "raw"}),
        name="raw",
        dispatch=False,
    )
    snap = services.snapshot_build(snapshot_id=snap.id)
    encoder = Encoder.objects.create(
        fingerprint="0" * 64, name="tiny", path="/nonexistent/tiny", family="text", model_type="bert", dim=8
    )
    job = RewardTrainingJob.objects.create(
        project=project,
        kind="bt",
        encoder=encoder,
        encoder_path=encoder.path,
        snapshot=snap,
        config={"lr": 0.01},
        created_by=manager,
        status=RewardTrainingJob.Status.SUCCEEDED,
        progress={"phase": "done"},
    )
    version = RewardModelVersion.objects.create(
        project=project,
        number=1,
        job=job,
        kind="bt",
        encoder=encoder,
        snapshot=snap,
        path="/nonexistent/v1",
        metrics={"holdout_accuracy": 0.5},
        curves=[{"step": 1, "loss": 0.7}],
    )
    SampleScore.objects.create(sample_id=ids[0], version=version, reward=0.25, aspects={"alignment": 0.1})
    queued = RewardTrainingJob.objects.create(
        project=project,
        kind="bt",
        encoder=encoder,
        encoder_path=encoder.path,
        snapshot=snap,
        config={},
        created_by=manager,
    )
    return {
        "base_url": live_server.url,
        "tokens": {
            "manager": Token.objects.create(user=manager).key,
            "annotator": Token.objects.create(user=annotator).key,
        },
        "ids": {"slug": "p1", "snapshot_id": snap.id, "job_id": queued.id, "number": version.number},
    }


# The served schema, as clients download it (JSON by ?format=json), read through the WSGI app at
# collection time (it needs no database); the requests go to the live server.
SCHEMA = schemathesis.openapi.from_wsgi(
    "/api/schema/?format=json",
    get_wsgi_application(),
    config=SchemathesisConfig.from_dict({"seed": 20261122}),
)
# An operation the schema cannot describe would be an Err here, and .ok() raises on it.
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]


def _failures(world: dict[str, Any], role: str) -> list[str]:
    """Run every operation with valid and with invalid inputs; the failures, each with the
    request that caused it (schemathesis prints a curl command to reproduce it)."""
    headers = {"Authorization": f"Token {world['tokens'][role]}"}
    found: list[str] = []
    calls = itertools.count()
    tally: Counter[str] = Counter()
    for operation in OPERATIONS:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],  # shrinking would multiply the time
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                # Four calls in five aim the path parameters at the world's rows, so requests
                # get past the 404 and reach the views; the rest keep the generated values.
                if case.path_parameters and next(calls) % 5:
                    for name, value in world["ids"].items():
                        if name in case.path_parameters:
                            case.path_parameters[name] = value
                response = case.call_and_validate(base_url=world["base_url"], headers=headers, checks=CHECKS)
                tally["tried"] += 1
                tally["refused" if response.status_code >= 400 else "accepted"] += 1

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): GET /api/projects/.
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (Exception, FailureGroup) as exc:  # a check failed: keep going, report them all
                found.append(f"{role} {operation.label} ({mode}): {exc}")
    report = os.environ.get("RL_RELIABILITY_REPORT")
    if report:  # the figures of docs/BENCHMARKS.md's reliability table
        with open(report, "a") as fh:
            fh.write(json.dumps({"test": f"schemathesis as {role}", "failures": len(found), **tally}) + "\n")
    return found


def test_operations_as_manager(world: dict[str, Any]) -> None:
    # 27 + four RL-job operations + two of generator versions + three of sampling jobs + an RL job's
    # metrics plot (issue 12) + the leaderboard and the loop's four operations (issue 13)
    assert len(OPERATIONS) == 42
    failures = _failures(world, "manager")
    assert not failures, "\n\n".join(failures)


def test_operations_as_annotator(world: dict[str, Any]) -> None:
    failures = _failures(world, "annotator")
    assert not failures, "\n\n".join(failures)
