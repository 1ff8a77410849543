"""Who a management command acts as: `--as-user NAME`, or the first superuser."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError


def acting_user(username: str | None) -> Any:
    users = get_user_model().objects
    user = (
        users.filter(username=username).first()
        if username
        else users.filter(is_superuser=True).order_by("id").first()
    )
    if user is None:
        raise CommandError(
            f"no user {username!r}"
            if username
            else "no acting user: create one with `python manage.py createsuperuser`, or pass --as-user NAME"
        )
    return user
