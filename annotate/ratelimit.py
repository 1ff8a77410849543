"""Failed-login limits per username and per client IP, kept in Django's cache (Redis).

One implementation for every place that checks a password (the login page, ``POST
/api/auth/token/``): the view asks ``login_retry_after`` before authenticating, reports the outcome
with ``login_failed`` / ``login_succeeded``; a refusal is a 429 (``login_check`` raises the API's,
``RateLimitedLoginView`` shows the form again). Only failures count; a success clears its username's count (not its IP's).

Each counter is a fixed window that opens at its first failure: ``RL_LOGIN_USER_ATTEMPTS`` failures
for one username (default 10) or ``RL_LOGIN_IP_ATTEMPTS`` from one IP (default 30) within
``RL_LOGIN_WINDOW_SECONDS`` (default 300) block further attempts, the right password included,
until that window closes. Usernames are compared case-insensitively and stored hashed.

If the cache is unreachable the limiter fails open: logins keep working, and each failure to reach
it is logged, because locking everyone out when Redis restarts would be worse than a few
unthrottled guesses.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from redis.exceptions import RedisError

from annotate.errors import RateLimited

log = logging.getLogger(__name__)

_PREFIX = "ratelimit:login"
# What a down or misconfigured cache raises (redis-py wraps most socket errors; not all).
_CACHE_ERRORS = (RedisError, OSError)


def client_ip(request: Any) -> str:
    """The client's address: ``REMOTE_ADDR``, or with ``RL_PROXY_COUNT`` = N reverse proxies in
    front, the entry the outermost of them appended to ``X-Forwarded-For`` (entries further left
    are whatever the client sent, so they are never trusted)."""
    proxies = settings.RL_PROXY_COUNT
    if proxies > 0:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        if len(hops) >= proxies:
            return hops[-proxies][:64]
    return str(request.META.get("REMOTE_ADDR") or "unknown")[:64]


def _keys(*, username: str, ip: str) -> list[tuple[str, int]]:
    name = hashlib.sha256(username.strip().casefold().encode()).hexdigest()[:32]
    return [
        (f"{_PREFIX}:user:{name}", settings.RL_LOGIN_USER_ATTEMPTS),
        (f"{_PREFIX}:ip:{ip}", settings.RL_LOGIN_IP_ATTEMPTS),
    ]


def login_retry_after(*, username: str, ip: str) -> int:
    """Seconds until ``username`` may try a password again from ``ip``; 0 when it may now."""
    keys = _keys(username=username, ip=ip)
    try:
        values = cache.get_many([k for k, _ in keys] + [f"{k}:start" for k, _ in keys])
    except _CACHE_ERRORS:
        log.warning("login rate limit: cache unreachable; not limiting", exc_info=True)
        return 0
    window = settings.RL_LOGIN_WINDOW_SECONDS
    wait = 0
    for key, limit in keys:
        if int(values.get(key) or 0) >= limit:
            start = values.get(f"{key}:start")
            left = window if start is None else math.ceil(float(start) + window - time.time())
            wait = max(wait, min(window, max(left, 1)))
    return wait


def login_failed(*, username: str, ip: str) -> None:
    """Count a failed password check against ``username`` and ``ip``."""
    window = settings.RL_LOGIN_WINDOW_SECONDS
    try:
        for key, _ in _keys(username=username, ip=ip):
            # The first failure opens the window (SET NX with a TTL); later ones INCR, which keeps
            # the TTL. If the key expired between the two, INCR made a fresh one without a TTL:
            # it then reads 1, so give it the window.
            if cache.add(key, 1, timeout=window):
                cache.set(f"{key}:start", time.time(), timeout=window)
                continue
            try:
                n = cache.incr(key)
            except ValueError:  # expired in between
                n = 1 if cache.add(key, 1, timeout=window) else cache.incr(key)
            if n == 1:
                cache.touch(key, timeout=window)
                cache.set(f"{key}:start", time.time(), timeout=window)
    except _CACHE_ERRORS:
        log.warning("login rate limit: cache unreachable; failure not counted", exc_info=True)


def login_succeeded(*, username: str) -> None:
    """A right password: the username's failures are forgiven (its IP's are not)."""
    key = _keys(username=username, ip="")[0][0]
    try:
        cache.delete_many([key, f"{key}:start"])
    except _CACHE_ERRORS:
        log.warning("login rate limit: cache unreachable; count not cleared", exc_info=True)


def message(retry_after: int) -> str:
    return f"too many failed login attempts; try again in {retry_after} s"


def login_check(*, username: str, ip: str) -> None:
    """``login_retry_after`` for the API: raise the 429 (``Retry-After`` comes from its details)."""
    wait = login_retry_after(username=username, ip=ip)
    if wait:
        raise RateLimited(message(wait), details={"retry_after": wait})


class RateLimitedAuthenticationForm(AuthenticationForm):
    """Django's login form with the limits: checked before the password, failures counted."""

    retry_after = 0

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        if username is None or not self.cleaned_data.get("password"):
            return super().clean()  # a missing field is no password attempt
        ip = client_ip(self.request)
        self.retry_after = login_retry_after(username=username, ip=ip)
        if self.retry_after:
            raise ValidationError(message(self.retry_after), code="rate_limited")
        try:
            cleaned = super().clean()
        except ValidationError:
            if self.user_cache is None:  # a wrong password, not an inactive account's refusal
                login_failed(username=username, ip=ip)
            raise
        login_succeeded(username=username)
        return cleaned


class RateLimitedLoginView(auth_views.LoginView):
    """``/accounts/login/``: a refused attempt shows the form again with status 429."""

    form_class = RateLimitedAuthenticationForm

    def form_invalid(self, form: Any) -> HttpResponse:
        response = super().form_invalid(form)
        if form.retry_after:
            response.status_code = 429
            response["Retry-After"] = str(form.retry_after)
        return response


def _admin_form() -> type[AuthenticationForm]:
    from django.contrib.admin.forms import AdminAuthenticationForm

    class RateLimitedAdminAuthenticationForm(RateLimitedAuthenticationForm, AdminAuthenticationForm):
        """The admin's login form (staff only) under the same limits."""

    return RateLimitedAdminAuthenticationForm


def protect_admin_login(site: Any) -> None:
    """``/admin/login/`` checks passwords too: the same limits as the other two."""
    site.login_form = _admin_form()
