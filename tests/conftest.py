"""Shared fixtures. Tests run on the embedded PostgreSQL (a test database on the same server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from annotate import services
from annotate.models import Project, ProjectMember, Sample


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Stop the embedded servers this test session started (none it merely attached to)."""
    from django.conf import settings

    from config import embedded

    if "redis" in embedded.STARTED:
        embedded.stop_redis(settings.VAR_DIR)
    if "postgres" in embedded.STARTED:
        from django.db import connections

        connections.close_all()
        embedded.stop_postgres(settings.VAR_DIR)


@pytest.fixture(autouse=True)
def _media_root(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_user(db: None) -> Callable[..., Any]:
    counter = {"n": 0}

    def make(username: str | None = None, *, staff: bool = False) -> Any:
        counter["n"] += 1
        name = username or f"user{counter['n']}"
        return get_user_model().objects.create_user(username=name, password="pw-" + name, is_staff=staff)

    return make


@pytest.fixture
def manager(make_user: Callable[..., Any]) -> Any:
    return make_user("manager", staff=True)


@pytest.fixture
def annotator(make_user: Callable[..., Any]) -> Any:
    return make_user("annotator")


@pytest.fixture
def make_project(manager: Any) -> Callable[..., Project]:
    def make(slug: str = "p1", *, annotators: tuple[Any, ...] = (), **kwargs: Any) -> Project:
        project = services.project_create(creator=manager, slug=slug, name=slug.upper(), **kwargs)
        for user in annotators:
            services.project_member_set(
                project=project, actor=manager, user=user, role=ProjectMember.Role.ANNOTATOR
            )
        return project

    return make


@pytest.fixture
def text_pairs(manager: Any) -> Callable[..., list[int]]:
    """Create ``n`` prompts with two text samples each and one comparison per prompt."""

    def make(project: Project, n: int = 3, **spec: Any) -> list[int]:
        items = []
        for i in range(n):
            items += [
                {"prompt": f"prompt {i}", "text": f"answer A{i}", "generator": "g", "generator_version": "a"},
                {"prompt": f"prompt {i}", "text": f"answer B{i}", "generator": "g", "generator_version": "b"},
            ]
        results = services.sample_create_texts(project=project, actor=manager, items=items)
        ids = [r.sample.id for r in results]
        specs = [{"samples": [ids[2 * i], ids[2 * i + 1]], **spec} for i in range(n)]
        return [c.id for c in services.comparisons_create(project=project, actor=manager, specs=specs)]

    return make


def sample_ids(project: Project) -> list[int]:
    return list(Sample.objects.filter(project=project).order_by("id").values_list("id", flat=True))
