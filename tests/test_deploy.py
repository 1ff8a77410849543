"""Production settings come from the environment: with RL_PRODUCTION=1 Django's deployment checks
pass with no warning, and the settings are what docker/compose.yaml relies on."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent


def _production_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "RL_", "SECURE_")) and k not in {"DB_TEST_NAME"}
    }
    env.update(
        {
            # The servers this test session already uses: nothing new starts.
            "DATABASE_URL": settings.DATABASE_URL,
            "REDIS_URL": settings.REDIS_URL,
            "RL_VAR_DIR": str(settings.VAR_DIR),
            "RL_PRODUCTION": "1",
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "DJANGO_ALLOWED_HOSTS": "rewardloop.example.org",
            "DJANGO_CSRF_TRUSTED_ORIGINS": "https://rewardloop.example.org",
        }
    )
    env.update(extra)
    return env


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_check_deploy_is_clean_in_production() -> None:
    done = _manage("check", "--deploy", "--fail-level", "WARNING", env=_production_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "System check identified no issues (0 silenced)."


def test_production_settings_values() -> None:
    code = (
        "from django.conf import settings as s; print(repr((s.DEBUG, s.SESSION_COOKIE_SECURE,"
        " s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS,"
        " s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD, s.SECURE_PROXY_SSL_HEADER,"
        " s.CSRF_TRUSTED_ORIGINS, s.ALLOWED_HOSTS, s.RL_PROXY_COUNT)))"
    )
    done = _manage("shell", "-c", code, env=_production_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == repr(
        (
            False,
            True,
            True,
            True,
            31_536_000,
            True,
            True,
            ("HTTP_X_FORWARDED_PROTO", "https"),
            ["https://rewardloop.example.org"],
            ["rewardloop.example.org"],
            1,
        )
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY must be set in production"),
        ({"DJANGO_ALLOWED_HOSTS": ""}, "DJANGO_ALLOWED_HOSTS must be set in production"),
        ({"DJANGO_DEBUG": "1"}, "RL_PRODUCTION=1 cannot run with DJANGO_DEBUG on"),
        ({"RL_LOGIN_USER_ATTEMPTS": "0"}, "RL_LOGIN_USER_ATTEMPTS must be >= 1, got 0"),
    ],
)
def test_production_refuses_to_start_misconfigured(extra: dict[str, str], message: str) -> None:
    done = _manage("check", env=_production_env(**extra))
    assert done.returncode != 0
    assert f"django.core.exceptions.ImproperlyConfigured: {message}" in done.stderr


def test_development_defaults_stay_plain_http(settings: Any) -> None:
    """Without RL_PRODUCTION (this test session), nothing forces HTTPS."""
    assert (settings.SESSION_COOKIE_SECURE, settings.SECURE_SSL_REDIRECT, settings.SECURE_HSTS_SECONDS) == (
        False,
        False,
        0,
    )
    assert settings.SECURE_PROXY_SSL_HEADER is None and settings.RL_PROXY_COUNT == 0


def test_compose_sets_the_production_variables() -> None:
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    for line in (
        'DJANGO_DEBUG: "0"',
        "RL_PRODUCTION: ${RL_PRODUCTION:-1}",
        "RL_PROXY_COUNT: ${RL_PROXY_COUNT:-1}",
        "DJANGO_SECRET_KEY: ${DJANGO_SECRET_KEY:?set DJANGO_SECRET_KEY}",
        "DJANGO_ALLOWED_HOSTS: ${DJANGO_ALLOWED_HOSTS:-localhost,127.0.0.1}",
        "DJANGO_CSRF_TRUSTED_ORIGINS: ${DJANGO_CSRF_TRUSTED_ORIGINS:-https://localhost,https://127.0.0.1}",
    ):
        assert f"  {line}\n" in compose, line
    # Its health check speaks as the TLS proxy would, or the HTTPS redirect would fail it.
    assert "headers={'X-Forwarded-Proto': 'https'}" in compose
