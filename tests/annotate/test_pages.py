"""Server-rendered pages and the media view: favicon, home page pills, stuck comparisons, refusals."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from annotate import selectors, services
from annotate.models import Comparison, ProjectMember
from tests.factories import png_bytes

pytestmark = pytest.mark.django_db


def session_client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_pages_link_a_favicon_that_is_served(manager: Any, make_project: Any) -> None:
    make_project("fav")
    client = session_client(manager)
    for url in ("/", "/label/fav/", "/accounts/login/"):
        page = client.get(url) if url != "/accounts/login/" else Client().get(url)
        assert page.status_code == 200, url
        links = re.findall(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page.content.decode())
        assert links == ["/static/favicon.svg"], url
    icon = Client().get("/static/favicon.svg")
    assert icon.status_code == 200
    assert icon["Content-Type"] == "image/svg+xml"
    body = b"".join(icon.streaming_content) if icon.streaming else icon.content  # type: ignore[attr-defined]
    assert body.startswith(b"<svg ")


def test_home_shows_mixed_for_an_empty_modality_and_no_empty_pill(manager: Any, make_project: Any) -> None:
    make_project("mix")  # modality "" = mixed
    make_project("img", modality="image")
    html = session_client(manager).get("/").content.decode()
    pills = re.findall(r'<span class="rl-tag">([^<]*)</span>', html)
    assert pills == ["image", "mixed"]  # ordered by project name: IMG, MIX
    assert re.findall(r'<span class="rl-tag rl-tag-muted">([^<]*)</span>', html) == ["manager", "manager"]
    assert "stuck" not in html


def _skip_all(project: Any, user: Any) -> list[int]:
    """Lease everything the user can get and skip it; the comparison ids skipped."""
    leases = services.assignment_next(project=project, annotator=user, n=20)
    for lease in leases:
        services.assignment_skip(project=project, annotator=user, assignment_id=lease.id)
    return [lease.comparison_id for lease in leases]


def test_a_comparison_every_active_annotator_skipped_is_reported_stuck(
    make_user: Callable[..., Any],
    manager: Any,
    make_project: Any,
    text_pairs: Callable[..., list[int]],
    django_assert_num_queries: Any,
) -> None:
    ann1 = make_user("ann1")
    project = make_project("stuck", annotators=(ann1,))
    ids = text_pairs(project, n=3)

    def stuck() -> int:
        return int(selectors.annotator_progress(project=project, annotator=manager)["project"]["stuck"])

    assert stuck() == 0
    # ann1 judges one, skips one, leaves one untouched.
    first, second = services.assignment_next(project=project, annotator=ann1, n=2)
    services.judgment_submit(project=project, annotator=ann1, assignment_id=first.id, choice="left")
    services.assignment_skip(project=project, annotator=ann1, assignment_id=second.id)
    assert stuck() == 1
    progress = selectors.annotator_progress(project=project, annotator=ann1)
    assert progress["me"] == {"judged": 1, "skipped": 1, "active_leases": 0, "available": 1}
    assert progress["project"] == {"comparisons": 3, "complete": 1, "judgments": 1, "stuck": 1}
    # The stuck count adds no query to progress; the per-project count is one query.
    with django_assert_num_queries(5):
        selectors.annotator_progress(project=project, annotator=ann1)
    with django_assert_num_queries(1):
        assert selectors.comparisons_stuck_counts(slugs=["stuck", "nope"]) == {"stuck": 1}

    # A second annotator could still be served it: no longer stuck. Leased by them: still not.
    ann2 = make_user("ann2")
    services.project_member_set(project=project, actor=manager, user=ann2, role=ProjectMember.Role.ANNOTATOR)
    assert stuck() == 0
    leases = services.assignment_next(project=project, annotator=ann2, n=20)
    assert sorted(lease.comparison_id for lease in leases) == sorted([second.comparison_id, ids[2]])
    assert stuck() == 0
    # ann2 skips both: the one ann1 skipped is stuck, the other one ann1 can still be served.
    for lease in leases:
        services.assignment_skip(project=project, annotator=ann2, assignment_id=lease.id)
    assert stuck() == 1
    # Paused annotators get no work, so they do not keep a comparison alive.
    services.project_member_set(
        project=project, actor=manager, user=ann1, role=ProjectMember.Role.ANNOTATOR, paused=True
    )
    assert stuck() == 2
    assert selectors.comparisons_stuck_counts(slugs=["stuck"]) == {"stuck": 2}
    # A disabled comparison is not waiting for anyone.
    Comparison.objects.filter(id=second.comparison_id).update(status=Comparison.Status.DISABLED)
    assert stuck() == 1


def test_overlap_two_judged_once_and_skipped_by_the_other_is_stuck(
    make_user: Callable[..., Any], manager: Any, make_project: Any, text_pairs: Callable[..., list[int]]
) -> None:
    ann1, ann2 = make_user("a1"), make_user("a2")
    project = make_project("ov", annotators=(ann1, ann2), overlap=2)
    text_pairs(project, n=1, overlap=2)
    (lease,) = services.assignment_next(project=project, annotator=ann1, n=1)
    services.judgment_submit(project=project, annotator=ann1, assignment_id=lease.id, choice="right")
    assert selectors.annotator_progress(project=project, annotator=manager)["project"]["stuck"] == 0
    _skip_all(project, ann2)
    assert selectors.annotator_progress(project=project, annotator=manager)["project"]["stuck"] == 1


def test_the_manager_sees_stuck_work_on_the_home_page_annotators_do_not(
    make_user: Callable[..., Any], manager: Any, make_project: Any, text_pairs: Callable[..., list[int]]
) -> None:
    ann = make_user("solo")
    project = make_project("solo", annotators=(ann,))
    text_pairs(project, n=2)
    assert len(_skip_all(project, ann)) == 2
    html = session_client(manager).get("/").content.decode()
    assert re.findall(r'<span class="rl-tag rl-tag-warn"[^>]*>([^<]*)</span>', html) == ["2 stuck"]
    assert "rl-tag-warn" not in session_client(ann).get("/").content.decode()


def test_the_label_page_has_an_end_screen_with_a_way_back(annotator: Any, make_project: Any) -> None:
    make_project("end", annotators=(annotator,))
    html = session_client(annotator).get("/label/end/").content.decode()
    assert 'id="rl-done"' in html
    assert '<a class="rl-button" href="/">Back to projects</a>' in html
    assert 'data-action="check-again"' in html
    assert '"role": "annotator"' in html


# --- media refusals ----------------------------------------------------------------------------------
@pytest.fixture
def media_sample(manager: Any, make_project: Any) -> Any:
    project = make_project("med", modality="image")
    return services.sample_create_media(
        project=project, actor=manager, file=io.BytesIO(png_bytes()), filename="a.png", prompt="p"
    ).sample


def _error(resp: Any) -> dict[str, Any]:
    assert resp["Content-Type"] == "application/json"
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["details"] == {}
    return body["error"]


def test_media_with_an_invalid_token_is_401_json(media_sample: Any) -> None:
    url = f"/media/samples/{media_sample.id}"
    bad = Client().get(url, HTTP_AUTHORIZATION="Token xyz")
    assert bad.status_code == 401
    assert bad["WWW-Authenticate"] == "Token"
    assert _error(bad) == {"code": "authentication_failed", "message": "Invalid token.", "details": {}}
    for header in ("Token", "Token a b"):  # malformed headers are refused the same way
        malformed = Client().get(url, HTTP_AUTHORIZATION=header)
        assert malformed.status_code == 401
        assert _error(malformed)["code"] == "authentication_failed"
    anonymous = Client().get(url)
    assert anonymous.status_code == 401
    assert _error(anonymous)["code"] == "not_authenticated"


def test_media_stays_isolated_between_projects(
    media_sample: Any, make_user: Callable[..., Any], make_project: Any, annotator: Any
) -> None:
    url = f"/media/samples/{media_sample.id}"
    stranger = make_user("stranger")
    make_project("other", annotators=(stranger,))
    token = Token.objects.create(user=stranger)
    for resp in (
        Client().get(url, HTTP_AUTHORIZATION=f"Token {token.key}"),
        session_client(stranger).get(url),
    ):
        assert resp.status_code == 404
        assert _error(resp) == {"code": "not_found", "message": "no such media", "details": {}}
    missing = session_client(stranger).get(f"/media/samples/{media_sample.id + 1000}")
    assert missing.status_code == 404
    assert _error(missing)["code"] == "not_found"
    # A member gets the bytes, by token and by session.
    services.project_member_set(
        project=media_sample.project,
        actor=media_sample.project.created_by,
        user=annotator,
        role=ProjectMember.Role.ANNOTATOR,
    )
    member_token = Token.objects.create(user=annotator)
    for resp in (
        Client().get(url, HTTP_AUTHORIZATION=f"Token {member_token.key}"),
        session_client(annotator).get(url),
    ):
        assert resp.status_code == 200
        assert b"".join(resp.streaming_content) == png_bytes()  # type: ignore[attr-defined]
