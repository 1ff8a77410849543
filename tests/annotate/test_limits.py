"""Limits that hold under hostile input: failed-login limits (real Redis), strangers learn nothing,
a judgment's source follows its authentication, upload size from Content-Length, expired leases
refused at submit, video duration from the stream."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.test import APIClient

from annotate import media, services
from annotate.errors import Conflict
from annotate.models import Assignment, Comparison, Judgment, Project, ProjectMember, Sample
from rewards.models import Encoder, RewardModelVersion, RewardTrainingJob
from tests.factories import client_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def limits_cache(settings: Any) -> None:
    """The real Redis, with a key prefix of this test's own: counters of other tests (or runs)
    cannot leak in, and these expire by themselves."""
    settings.CACHES = {
        "default": {**django_settings.CACHES["default"], "KEY_PREFIX": f"test-limits-{uuid.uuid4().hex}"}
    }


def _token(username: str, password: str, ip: str = "10.0.0.1") -> Any:
    return APIClient().post(
        "/api/auth/token/", {"username": username, "password": password}, format="json", REMOTE_ADDR=ip
    )


def _rate_limited(r: Any, window: int) -> int:
    assert r.status_code == 429, r.content
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == "rate_limited"
    wait = err["details"]["retry_after"]
    assert err == {
        "code": "rate_limited",
        "message": f"too many failed login attempts; try again in {wait} s",
        "details": {"retry_after": wait},
    }
    assert r["Retry-After"] == str(wait)
    assert 1 <= wait <= window
    return int(wait)


# --- 1. failed-login limits --------------------------------------------------------------------
def test_token_limit_per_username_holds_until_the_window_passes(
    limits_cache: None, settings: Any, make_user: Any
) -> None:
    settings.RL_LOGIN_WINDOW_SECONDS = 3
    make_user("alice")
    make_user("bob")
    for _ in range(10):
        r = _token("alice", "wrong")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_credentials")
    _rate_limited(_token("alice", "wrong"), 3)
    # The right password too, and from another IP: the username is what is limited.
    _rate_limited(_token("alice", "pw-alice"), 3)
    _rate_limited(_token("alice", "pw-alice", ip="10.0.0.2"), 3)
    # Case does not get around it.
    _rate_limited(_token("ALICE", "pw-alice"), 3)
    # Another user from the same IP is not affected.
    assert _token("bob", "pw-bob").status_code == 200
    time.sleep(3.2)
    r = _token("alice", "pw-alice")
    assert r.status_code == 200 and len(r.json()["token"]) == 40


def test_token_limit_per_ip(limits_cache: None, make_user: Any) -> None:
    """30 failures from one IP (defaults), spread over usernames so no username reaches its 10."""
    make_user("carol")
    for i in range(30):
        assert _token(f"guess{i % 5}-{i}", "x", ip="10.0.0.7").status_code == 400
    _rate_limited(_token("carol", "pw-carol", ip="10.0.0.7"), 300)
    # The same user from another IP is fine.
    assert _token("carol", "pw-carol", ip="10.0.0.8").status_code == 200


def test_a_right_password_clears_the_username_count(limits_cache: None, make_user: Any) -> None:
    make_user("dave")
    for _ in range(9):
        assert _token("dave", "wrong").status_code == 400
    assert _token("dave", "pw-dave").status_code == 200
    for _ in range(10):
        assert _token("dave", "wrong").status_code == 400
    _rate_limited(_token("dave", "wrong"), 300)


def test_login_page_limit_is_the_same_limit(limits_cache: None, make_user: Any) -> None:
    """One limiter for both: 5 failures on the page plus 5 on the token endpoint make 10."""
    user = make_user("erin")
    make_user("frank")
    page = Client(REMOTE_ADDR="10.0.1.1")
    for _ in range(5):
        r = page.post("/accounts/login/", {"username": "erin", "password": "wrong"})
        assert r.status_code == 200
        assert b"Please enter a correct username and password" in r.content
    for _ in range(5):
        assert _token("erin", "wrong", ip="10.0.1.1").status_code == 400
    r = page.post("/accounts/login/", {"username": "erin", "password": "pw-erin"})
    assert r.status_code == 429
    wait = int(r["Retry-After"])
    assert 1 <= wait <= 300
    text = r.content.decode()
    assert f"too many failed login attempts; try again in {wait} s" in text
    assert '<form method="post"' in text  # the login page, shown again
    assert "_auth_user_id" not in page.session
    _rate_limited(_token("erin", "pw-erin", ip="10.0.1.1"), 300)
    # Someone else logs in from the same IP.
    r = page.post("/accounts/login/", {"username": "frank", "password": "pw-frank"})
    assert (r.status_code, r["Location"]) == (302, "/")
    assert page.session["_auth_user_id"] != str(user.id)


def test_admin_login_is_under_the_same_limit(limits_cache: None, make_user: Any) -> None:
    """/admin/login/ checks passwords too: 10 failures there lock the username everywhere."""
    make_user("gina", staff=True)
    page = Client(REMOTE_ADDR="10.0.2.1")
    for _ in range(10):
        r = page.post("/admin/login/", {"username": "gina", "password": "wrong"})
        assert r.status_code == 200 and b"Please enter the correct username and password" in r.content
    r = page.post("/admin/login/", {"username": "gina", "password": "pw-gina"})
    assert r.status_code == 200
    assert b"too many failed login attempts; try again in" in r.content
    assert "_auth_user_id" not in page.session
    _rate_limited(_token("gina", "pw-gina", ip="10.0.2.2"), 300)


def test_missing_fields_are_not_attempts(limits_cache: None, make_user: Any) -> None:
    make_user("gina")
    page = Client(REMOTE_ADDR="10.0.2.1")
    for _ in range(12):
        assert page.post("/accounts/login/", {"username": "gina"}).status_code == 200
        assert APIClient().post("/api/auth/token/", {"username": "gina"}, format="json").status_code == 400
    assert _token("gina", "pw-gina", ip="10.0.2.1").status_code == 200


def test_login_works_when_redis_is_down(
    settings: Any, make_user: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail open, logged: a cache that cannot be reached limits nothing."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"unix://{tmp_path}/no-redis-here.sock",
        }
    }
    make_user("hank")
    with caplog.at_level(logging.WARNING, logger="annotate.ratelimit"):
        for _ in range(12):
            assert _token("hank", "wrong").status_code == 400
        assert _token("hank", "pw-hank").status_code == 200
        r = Client().post("/accounts/login/", {"username": "hank", "password": "pw-hank"})
        assert (r.status_code, r["Location"]) == (302, "/")
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "annotate.ratelimit"]
    assert "login rate limit: cache unreachable; not limiting" in messages
    assert "login rate limit: cache unreachable; failure not counted" in messages


# --- 2. non-members learn nothing ----------------------------------------------------------------
def _project_routes() -> list[tuple[str, str]]:
    """(method, path with `{slug}`) of every API route with a project slug in it."""
    out: list[tuple[str, str]] = []

    def walk(patterns: Any, prefix: str) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            if isinstance(p, URLResolver):
                walk(p.url_patterns, route)
            elif isinstance(p, URLPattern) and re.search(r"<\w+:slug>", route) and route.startswith("api/"):
                view = p.callback.view_class  # type: ignore[attr-defined]
                path = "/" + re.sub(r"<int:\w+>", "1", re.sub(r"<\w+:slug>", "{slug}", route))
                out.extend((m, path) for m in ("get", "post") if hasattr(view, m))

    walk(get_resolver().url_patterns, "")
    return out


ROUTES = _project_routes()
# Bodies a stranger might send: nothing, empty, wrong types, malformed JSON, and plausible ones.
BODIES: list[tuple[str, Any]] = [
    ("none", None),
    ("empty", {}),
    ("junk", {"samples": "x", "assignment": "abc", "comparisons": 5, "kind": "nope", "schema": "?"}),
    ("plausible", {"username": "manager", "role": "annotator", "assignment": 1, "choice": "left"}),
    ("simulated", {"assignment": 1, "choice": "left", "source": "simulated"}),
    ("malformed", b"{not json"),
    ("multipart", "multipart"),
]


def _send(client: APIClient, method: str, path: str, body: Any) -> Any:
    if method == "get":
        return client.get(path + "?n=abc&next=-1&schema=bogus&format=zip")
    if body is None:
        return client.post(path)
    if isinstance(body, bytes):
        return client.post(path, body, content_type="application/json")
    if body == "multipart":
        return client.post(
            path, {"file": SimpleUploadedFile("a.zip", b"PK\x03\x04junk"), "prompt": "p"}, format="multipart"
        )
    return client.post(path, body, format="json")


def test_routes_cover_the_project_api() -> None:
    # 24 + the four RL-job routes + generator versions (list, register) and sampling jobs (list,
    # create, detail) + an RL job's metrics plot (issue 12) + the leaderboard and the loop (get, set,
    # pause, resume) (issue 13)
    assert len(ROUTES) == 39
    assert ("post", "/api/projects/{slug}/judgments/") in ROUTES
    assert ("post", "/api/projects/{slug}/reward-models/1/activate/") in ROUTES
    assert ("post", "/api/projects/{slug}/rl-jobs/1/cancel/") in ROUTES
    assert ("post", "/api/projects/{slug}/sampling-jobs/") in ROUTES


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_a_stranger_gets_the_same_404_whatever_the_body(
    make_user: Any, make_project: Any, text_pairs: Any, method: str, path: str
) -> None:
    member = make_user("member")
    project = make_project("secret", annotators=(member,))
    text_pairs(project, n=1)
    client_for(member).get("/api/projects/secret/next/")  # a lease exists (assignment ids start low)
    stranger = client_for(make_user("stranger"))
    url = path.format(slug="secret")
    counts = (Judgment.objects.count(), Assignment.objects.count(), ProjectMember.objects.count())
    seen = {name: _send(stranger, method, url, body) for name, body in BODIES}
    # The same slug once no project has it.
    Project.objects.filter(id=project.id).update(slug="moved")
    missing = _send(stranger, method, url, {})
    assert missing.status_code == 404
    assert missing.content == b'{"error":{"code":"not_found","message":"no project \'secret\'","details":{}}}'
    for name, r in seen.items():
        assert (name, r.status_code, r.content) == (name, 404, missing.content)
    assert (Judgment.objects.count(), Assignment.objects.count(), ProjectMember.objects.count()) == counts


def test_members_endpoint_is_no_username_oracle(
    make_user: Any, make_project: Any, annotator: Any, manager: Any
) -> None:
    make_project("team", annotators=(annotator,))
    c = client_for(annotator)
    existing = c.post("/api/projects/team/members/", {"username": "manager"}, format="json")
    nobody = c.post("/api/projects/team/members/", {"username": "nobody-at-all"}, format="json")
    junk = c.post("/api/projects/team/members/", {"role": 7}, format="json")
    assert existing.status_code == nobody.status_code == junk.status_code == 403
    assert existing.content == nobody.content == junk.content
    assert existing.json()["error"]["message"] == "this needs the manager role in team"
    assert ProjectMember.objects.filter(project__slug="team").count() == 2
    # The manager is told, and can add real users.
    r = client_for(manager).post("/api/projects/team/members/", {"username": "nobody-at-all"}, format="json")
    assert (r.status_code, r.json()["error"]["message"]) == (404, "no user 'nobody-at-all'")
    make_user("newbie")
    r = client_for(manager).post("/api/projects/team/members/", {"username": "newbie"}, format="json")
    assert r.json() == {"username": "newbie", "role": "annotator", "paused": False}


def test_reward_paths_only_for_staff(make_user: Any, make_project: Any, manager: Any) -> None:
    from annotate.models import DatasetSnapshot

    boss = make_user("boss")  # a manager of the project, not staff
    project = make_project("rm")
    services.project_member_set(project=project, actor=manager, user=boss, role=ProjectMember.Role.MANAGER)
    encoder = Encoder.objects.create(
        fingerprint="f" * 64, name="tiny", path="/srv/models/tiny", family="text", model_type="bert", dim=4
    )
    snap = DatasetSnapshot.objects.create(project=project, spec={}, created_by=manager)
    job = RewardTrainingJob.objects.create(
        project=project,
        kind="bt",
        encoder=encoder,
        encoder_path="/srv/models/tiny",
        snapshot=snap,
        config={},
        created_by=manager,
    )
    RewardModelVersion.objects.create(
        project=project,
        number=1,
        job=job,
        kind="bt",
        encoder=encoder,
        snapshot=snap,
        path="/srv/media/reward_models/rm/v1",
    )
    urls = ["/api/projects/rm/reward-jobs/", f"/api/projects/rm/reward-jobs/{job.id}/"]
    urls += ["/api/projects/rm/reward-models/", "/api/projects/rm/reward-models/1/"]
    for url in urls:
        r = client_for(boss).get(url)
        assert r.status_code == 200, r.content
        assert b"/srv/" not in r.content, url
        assert client_for(manager).get(url).content.count(b"/srv/") == 1, url
    assert client_for(boss).get(urls[1]).json()["encoder"] == {"name": "tiny", "family": "text"}
    staff_view = client_for(manager).get(urls[3]).json()
    assert staff_view["path"] == "/srv/media/reward_models/rm/v1"


# --- 3. a judgment's source is how its request authenticated -----------------------------------
def _lease(client: APIClient, slug: str) -> int:
    return int(client.get(f"/api/projects/{slug}/next/").json()["items"][0]["assignment"])


def _submit(client: APIClient, slug: str, assignment: int, **extra: Any) -> Any:
    return client.post(
        f"/api/projects/{slug}/judgments/",
        {"assignment": assignment, "choice": "left", **extra},
        format="json",
    )


@pytest.mark.parametrize(
    ("auth", "body_source", "simulated_group", "status", "stored"),
    [
        ("token", None, False, 201, "api"),
        ("token", "api", False, 201, "api"),
        ("token", "ui", False, 400, None),
        ("token", "simulated", False, 400, None),
        ("token", "simulated", True, 201, "simulated"),
        ("session", None, False, 201, "ui"),
        ("session", "ui", False, 201, "ui"),
        ("session", "api", False, 400, None),
        ("session", "simulated", True, 400, None),
    ],
)
def test_source_follows_authentication(
    annotator: Any,
    make_project: Any,
    text_pairs: Any,
    auth: str,
    body_source: str | None,
    simulated_group: bool,
    status: int,
    stored: str | None,
) -> None:
    project = make_project("src", annotators=(annotator,))
    text_pairs(project, n=1)
    if simulated_group:
        annotator.groups.add(Group.objects.create(name=Judgment.SIMULATED_GROUP))
    if auth == "token":
        c = client_for(annotator)
    else:
        c = APIClient(enforce_csrf_checks=False)
        c.force_login(annotator)
    lease = _lease(c, "src")
    r = _submit(c, "src", lease, **({} if body_source is None else {"source": body_source}))
    assert r.status_code == status, r.content
    if stored is None:
        own = "api" if auth == "token" else "ui"
        assert r.json()["error"] == {
            "code": "invalid",
            "message": f'source: "{body_source}" is not this request\'s source ("{own}"); only token '
            'users in the "simulated" group may send "simulated"',
            "details": {
                "fields": {
                    "source": [
                        f'"{body_source}" is not this request\'s source ("{own}"); only token users in '
                        'the "simulated" group may send "simulated"'
                    ]
                }
            },
        }
        assert Judgment.objects.count() == 0
        assert Assignment.objects.get(id=lease).status == "active"
    else:
        assert list(Judgment.objects.values_list("source", flat=True)) == [stored]


# --- 4. upload size from Content-Length, before the body ----------------------------------------
def _headers_only_post(live_server: Any, path: str, auth_header: str, length: int) -> tuple[bytes, bytes]:
    """A real HTTP POST that claims ``length`` bytes and sends none: (status line + headers, body)
    of the answer. The read times out (and the test fails) if the server waits for the body."""
    url = urlparse(live_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\n{auth_header}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n"
                f"Content-Length: {length}\r\n\r\n"
            ).encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("endpoint", ["imports/samples/", "imports/preferences/?format=trl", "samples/"])
def test_upload_refused_from_its_content_length(live_server: Any, manager: Any, endpoint: str) -> None:
    """A real HTTP request whose header claims one byte over the limit and sends no body: the 413
    comes back at once, so the server did not wait for the body."""
    from rest_framework.authtoken.models import Token

    services.project_create(creator=manager, slug="big", name="Big")
    token = Token.objects.create(user=manager).key
    limit = django_settings.RL_MAX_UPLOAD_BYTES
    head, body = _headers_only_post(
        live_server, f"/api/projects/big/{endpoint}", f"Authorization: Token {token}", limit + 1
    )
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert json.loads(body) == {
        "error": {
            "code": "too_large",
            "message": f"request is {limit + 1} bytes; the upload limit is {limit} bytes",
            "details": {},
        }
    }
    assert Sample.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_upload_refused_from_its_content_length_for_a_browser_session(live_server: Any, manager: Any) -> None:
    """The same for a logged-in browser: the CSRF check of a session request reads the whole body
    before any view runs, so the limit is checked first, in the middleware."""
    from django.test import Client

    services.project_create(creator=manager, slug="bigs", name="Big")
    browser = Client()
    browser.force_login(manager)
    session = browser.cookies["sessionid"].value
    limit = django_settings.RL_MAX_UPLOAD_BYTES
    head, body = _headers_only_post(
        live_server, "/api/projects/bigs/imports/samples/", f"Cookie: sessionid={session}", limit + 1
    )
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert json.loads(body)["error"]["code"] == "too_large"


def test_content_length_that_is_no_number(manager: Any, make_project: Any) -> None:
    make_project("cl")
    r = client_for(manager).post(
        "/api/projects/cl/imports/samples/",
        {"file": SimpleUploadedFile("a.zip", b"PK")},
        format="multipart",
        CONTENT_LENGTH="lots",
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Content-Length must be an integer, got 'lots'"


# --- 5. an expired lease is refused at submit time ------------------------------------------------
def test_expired_lease_refused_before_any_sweep(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    project = make_project("late", annotators=(annotator,))
    (cid,) = text_pairs(project, n=1)
    c = client_for(annotator)
    lease = _lease(c, "late")
    assert Comparison.objects.get(id=cid).slots_taken == 1
    Assignment.objects.filter(id=lease).update(expires_at=timezone.now() - timedelta(seconds=1))
    r = _submit(c, "late", lease, idempotency_key="k1")
    assert r.status_code == 409
    assert r.json() == {
        "error": {
            "code": "lease_expired",
            "message": "this lease expired; fetch a new comparison",
            "details": {},
        }
    }
    assert Judgment.objects.count() == 0
    # Expired as the sweep would have: its slot is back, the sweep finds nothing left to do.
    a = Assignment.objects.get(id=lease)
    assert (a.status, a.finished_at is not None) == ("expired", True)
    c_row = Comparison.objects.get(id=cid)
    assert (c_row.slots_taken, c_row.judgments_count, c_row.status) == (0, 0, "open")
    assert services.leases_expire() == 0
    # Submitting again is the usual refusal of a released lease.
    r = _submit(c, "late", lease)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "lease_released")
    # Nobody is served a comparison twice.
    assert c.get("/api/projects/late/next/").json()["items"] == []


def test_expiry_boundary_is_the_sweeps(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    """expires_at == now is expired (the sweep uses expires_at <= now); a second before is not."""
    project = make_project("edge", annotators=(annotator,))
    text_pairs(project, n=2)
    a1, a2 = services.assignment_next(project=project, annotator=annotator, n=2)
    with pytest.raises(Conflict, match="this lease expired; fetch a new comparison"):
        services.judgment_submit(
            project=project, annotator=annotator, assignment_id=a1.id, choice="left", now=a1.expires_at
        )
    done = services.judgment_submit(
        project=project,
        annotator=annotator,
        assignment_id=a2.id,
        choice="left",
        now=a2.expires_at - timedelta(seconds=1),
    )
    assert done.created and Judgment.objects.get().assignment_id == a2.id
    assert Assignment.objects.get(id=a1.id).status == "expired"


@pytest.mark.django_db(transaction=True)
def test_expired_lease_in_autocommit_keeps_the_expiry(
    annotator: Any, make_project: Any, text_pairs: Any
) -> None:
    """Outside a transaction (as in a web request) the refusal still commits the expiry."""
    project = make_project("auto", annotators=(annotator,))
    (cid,) = text_pairs(project, n=1)
    (lease,) = services.assignment_next(project=project, annotator=annotator)
    with pytest.raises(Conflict) as info:
        services.labeling_submit(
            slug="auto",
            annotator=annotator,
            assignment_id=lease.id,
            choice="left",
            now=lease.expires_at + timedelta(seconds=5),
        )
    assert info.value.code == "lease_expired"
    assert Assignment.objects.get(id=lease.id).status == "expired"
    assert Comparison.objects.get(id=cid).slots_taken == 0
    assert Judgment.objects.count() == 0


# --- 6. video duration from the stream, not only the header --------------------------------------
def _webm_without_duration(seconds: float, fps: int = 12, size: int = 16) -> bytes:
    """A VP8 WebM written as a live stream: no Duration element in its header."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm", options={"live": "1"}) as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            arr = np.full((size, size, 3), (i * 10) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_webm_without_duration_header_is_measured(settings: Any) -> None:
    import av

    data = _webm_without_duration(2)
    with av.open(io.BytesIO(data), mode="r") as container:  # what the old check looked at
        assert (container.duration, container.streams.video[0].duration) == (None, None)
    info = media.inspect_video(io.BytesIO(data))
    assert (info.duration, info.frames, info.fps) == (2.0, 24, 12.0)
    settings.RL_MAX_VIDEO_SECONDS = 1
    with pytest.raises(media.MediaTooLarge, match=r"^video plays for more than 1\.1 s; the limit is 1 s$"):
        media.inspect_video(io.BytesIO(data))


def test_long_headerless_webm_upload_is_refused(settings: Any, manager: Any, make_project: Any) -> None:
    make_project("vid", modality="video")
    settings.RL_MAX_VIDEO_SECONDS = 1
    r = client_for(manager).post(
        "/api/projects/vid/samples/",
        {"file": SimpleUploadedFile("clip.webm", _webm_without_duration(2)), "prompt": "a clip"},
        format="multipart",
    )
    assert r.status_code == 413, r.content
    assert r.json()["error"] == {
        "code": "too_large",
        "message": "clip.webm: video plays for more than 1.1 s; the limit is 1 s",
        "details": {},
    }
    assert Sample.objects.count() == 0


def test_a_simulated_submit_stays_one_statement(annotator: Any, make_project: Any, text_pairs: Any) -> None:
    """The group check is remembered with the cached token user: after the first submit, a
    simulated annotator's submit is the one labeling statement, like anyone else's."""
    project = make_project("simq", annotators=(annotator,))
    text_pairs(project, n=3)
    annotator.groups.add(Group.objects.create(name=Judgment.SIMULATED_GROUP))
    c = client_for(annotator)
    leases = c.get("/api/projects/simq/next/?n=3").json()["items"]
    r = _submit(c, "simq", leases[0]["assignment"], source="simulated")
    assert r.status_code == 201, r.content
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as simulated:
        r = _submit(c, "simq", leases[1]["assignment"], source="simulated")
    assert r.status_code == 201, r.content
    with CaptureQueriesContext(connection) as plain:
        r = _submit(c, "simq", leases[2]["assignment"])
    assert r.status_code == 201, r.content
    # Inside the test's transaction the statement is wrapped in a savepoint: compare, not count.
    assert [q["sql"].split()[0] for q in simulated.captured_queries] == [
        q["sql"].split()[0] for q in plain.captured_queries
    ]
    assert sum("rl_submit" in q["sql"] for q in plain.captured_queries) == 1
    assert list(Judgment.objects.order_by("id").values_list("source", flat=True)) == [
        "simulated",
        "simulated",
        "api",
    ]
