"""Row and payload factories shared by the tests."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: int = 12, size: int = 32, fps: int = 12, seed: int = 0) -> bytes:
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), (i * 20 + seed * 7) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def client_for(user: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


# Every table a refused request must leave untouched (Django's own bookkeeping excluded).
_WATCHED = (
    "auth_user",
    "authtoken_token",
    "annotate_project",
    "annotate_projectmember",
    "annotate_prompt",
    "annotate_generator",
    "annotate_generatorversion",
    "annotate_sample",
    "annotate_comparison",
    "annotate_comparisonsample",
    "annotate_assignment",
    "annotate_judgment",
    "annotate_datasetsnapshot",
    "rewards_rewardconfig",
    "rewards_rewardtrainingjob",
)


def rows_digest() -> dict[str, str]:
    """A digest of every row of the watched tables: equal before and after means nothing changed
    (not only the counts)."""
    from django.db import connection

    out = {}
    with connection.cursor() as cur:
        for table in _WATCHED:
            cur.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
            )
            n, digest = cur.fetchone()
            out[table] = f"{n}:{digest}"
    return out


@contextmanager
def broker_unreachable() -> Iterator[None]:
    """The real Celery publisher pointed at a socket nothing listens on, for the block. The app's
    references to its pools are dropped (kombu keeps the real pool, keyed by its URL, for after)."""
    from config.celery import app

    old = app.conf.broker_url
    app._pool = None
    app.amqp._producer_pool = None
    app.conf.broker_url = "redis+socket:///nonexistent/redis.sock"
    app.conf.broker_connection_retry = False
    try:
        yield
    finally:
        app._pool = None
        app.amqp._producer_pool = None
        app.conf.broker_url = old
        app.conf.broker_connection_retry = True
