"""Token authentication with a short in-process cache.

Every API request authenticates; reading the token row each time is a database round trip on the
labeling hot path. Each worker process keeps a token for ``RL_TOKEN_CACHE_SECONDS`` (default 30;
0 turns the cache off), so a deleted token or deactivated user is refused within that window.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from rest_framework.authentication import TokenAuthentication

_MAX_ENTRIES = 10_000


class CachedTokenAuthentication(TokenAuthentication):
    _cache: dict[str, tuple[float, Any, Any]] = {}

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        ttl = settings.RL_TOKEN_CACHE_SECONDS
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        user, token = super().authenticate_credentials(key)
        if ttl > 0:
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = (now + ttl, user, token)
        return user, token
