"""The simulated annotators' accounts: users in the ``simulated`` group (so they may say
``"source": "simulated"``), with API tokens, made annotators of a project through annotate's
service."""

from __future__ import annotations

import re
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from rest_framework.authtoken.models import Token

from annotate.errors import Invalid
from annotate.models import Judgment, Project, ProjectMember
from annotate.services import project_member_set

MAX_ANNOTATORS = 200


def simulated_annotators_ensure(
    *, project: Project, actor: Any, count: int, prefix: str = "sim"
) -> list[tuple[Any, str]]:
    """``count`` simulated annotators of ``project`` (``<prefix>-<project>-<n>``), created or reused,
    each with its API token. Managers only; refused for a count outside 1..200 or a bad prefix."""
    if not 1 <= count <= MAX_ANNOTATORS:
        raise Invalid(f"count must be 1..{MAX_ANNOTATORS}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,30}", prefix):
        raise Invalid("prefix: lower-case letters, digits, - and _ (1-31 characters)")
    users = get_user_model()
    out = []
    with transaction.atomic():
        group, _ = Group.objects.get_or_create(name=Judgment.SIMULATED_GROUP)
        for n in range(1, count + 1):
            user, created = users.objects.get_or_create(username=f"{prefix}-{project.slug}-{n}"[:150])
            if created:
                user.set_unusable_password()  # token only: nobody logs in as a simulated annotator
                user.save(update_fields=["password"])
            group.user_set.add(user)
            if not ProjectMember.objects.filter(project=project, user=user).exists():
                project_member_set(project=project, actor=actor, user=user, role=ProjectMember.Role.ANNOTATOR)
            token, _ = Token.objects.get_or_create(user=user)
            out.append((user, token.key))
    return out


def simulated_annotators_run(
    *,
    project_id: int,
    annotators: int = 3,
    preference: str = "brightness",
    noise: float = 0.1,
    position_bias: float = 0.0,
    spammers: float = 0.0,
    think_ms: float = 0.0,
    labels: int | None = None,
    seed: int = 0,
    url: str = "",
    progress: Any = None,
) -> dict[str, Any]:
    """``annotators`` simulated annotators judge the project through the REST API (over HTTP to
    ``url``, or in-process) until each made ``labels`` judgments or nothing is left to judge. A
    ``spammers`` share of them answer at random. Returns the totals."""
    from simulate import annotators as sim

    project = Project.objects.get(id=project_id)
    manager = ProjectMember.objects.filter(project=project, role=ProjectMember.Role.MANAGER).first()
    if manager is None:
        raise Invalid(f"project {project.slug} has no manager to add annotators")
    if not 0.0 <= spammers <= 1.0:
        raise Invalid("spammers must be a share in [0, 1]")
    try:
        pref = sim.preference_from_spec(preference)
        accounts = simulated_annotators_ensure(project=project, actor=manager.user, count=annotators)
        n_spam = round(spammers * len(accounts))
        profiles = [
            sim.Profile(
                preference=pref,
                noise=noise,
                position_bias=position_bias,
                think_ms=think_ms,
                spammer=k < n_spam,
                seed=seed * 1000 + k,
            )
            for k in range(len(accounts))
        ]
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    workers = [
        sim.SimulatedAnnotator(
            sim.HttpClient(url, token) if url else sim.DjangoClient(token), project.slug, p
        )
        for (_, token), p in zip(accounts, profiles, strict=True)
    ]
    results = sim.run_all(workers, max_labels=labels, progress=progress)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {
        "annotators": len(workers),
        "judgments": sum(r.labels for r in results),
        "skips": sum(r.skips for r in results),
        "errors": errors,
    }
