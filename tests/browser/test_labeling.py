"""The labeling page in real headless Chromium, driven the way an annotator does: keyboard only."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from annotate import services
from annotate.models import Judgment, ProjectMember
from simulate import generators as demo_media
from tests.factories import mp4_bytes, png_bytes

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Playwright's sync API runs an event loop in this thread; the ORM calls below are still plain
# synchronous calls between page actions.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_js(page: Any, expr: str, timeout: float = 15.0) -> Any:
    """Poll an expression (page.wait_for_function needs eval, which our CSP forbids)."""
    end = time.monotonic() + timeout
    while True:
        value = page.evaluate(expr)
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {expr}")
        time.sleep(0.05)


def login(browser: Any, live_server: Any, username: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.dialogs = []
    page.errors = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", "pw-" + username)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(f"{live_server.url}/")
    return page


def shown(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => ({
        assignment: document.getElementById('rl-stage').dataset.assignment,
        left: Number(document.querySelector('.rl-panel[data-side=left]').dataset.sample),
        right: Number(document.querySelector('.rl-panel[data-side=right]').dataset.sample),
        modality: document.querySelector('.rl-panel[data-side=left]').dataset.modality,
        srcs: [...document.querySelectorAll('.rl-panel img, .rl-panel video')].map(e => e.src),
        prompt: document.getElementById('rl-prompt').textContent,
    })"""
    )


def next_item(page: Any, previous: str) -> dict[str, Any]:
    wait_js(
        page,
        "document.body.dataset.state !== 'ready'"
        f" || document.getElementById('rl-stage').dataset.assignment !== '{previous}'",
    )
    return shown(page)


@pytest.fixture
def mixed_project(make_user: Any, manager: Any, make_project: Any) -> Any:
    annotator = make_user("ann")
    project = make_project(
        "mixed", annotators=(annotator,), instructions="# Judge carefully\n\nPrefer *sharp* outputs."
    )
    samples = {}
    for kind, prompt, payloads in [
        ("image", "a red square", [png_bytes((220, 20, 20)), png_bytes((120, 10, 10))]),
        ("video", "a moving ball", [mp4_bytes(seed=1), mp4_bytes(seed=2)]),
    ]:
        samples[kind] = [
            services.sample_create_media(
                project=project, actor=manager, file=io.BytesIO(data), filename=f"f{i}", prompt=prompt
            ).sample.id
            for i, data in enumerate(payloads)
        ]
    texts = services.sample_create_texts(
        project=project,
        actor=manager,
        items=[
            {"prompt": "explain tides", "text": demo_media.compose_text("explain tides", seed=s, style=st)}
            for s, st in ((1, "clean"), (2, "noisy"))
        ],
    )
    samples["text"] = [r.sample.id for r in texts]
    services.comparisons_create(
        project=project,
        actor=manager,
        specs=[
            {"samples": samples["image"], "priority": 3},
            {"samples": samples["video"], "priority": 2},
            {"samples": samples["text"], "priority": 1},
        ],
    )
    return project


def test_judge_image_video_text_with_the_keyboard(browser: Any, live_server: Any, mixed_project: Any) -> None:
    page = login(browser, live_server, "ann")
    page.goto(f"{live_server.url}/label/mixed/")
    wait_js(page, "document.body.dataset.state === 'ready'")

    # Instructions are one key away, rendered from markdown.
    page.keyboard.press("?")
    assert page.is_visible("#rl-instructions")
    assert page.inner_text("#rl-instructions-body h1") == "Judge carefully"
    page.keyboard.press("Escape")
    assert not page.is_visible("#rl-instructions")

    first = shown(page)
    assert first["modality"] == "image"
    assert first["prompt"] == "a red square"
    assert all(src.startswith("blob:") for src in first["srcs"])
    # The next two comparisons are already prefetched, media included.
    wait_js(page, "window.__rl.prefetched.length === 2")
    page.keyboard.press("ArrowLeft")

    second = next_item(page, first["assignment"])
    assert second["modality"] == "video"
    assert len(second["srcs"]) == 2
    assert all(src.startswith("blob:") for src in second["srcs"])
    # Both players play together; space pauses both; '.' steps both by one frame.
    wait_js(page, "[...document.querySelectorAll('video')].every(v => !v.paused)")
    page.keyboard.press(" ")
    wait_js(page, "[...document.querySelectorAll('video')].every(v => v.paused)")
    page.keyboard.press(".")
    page.keyboard.press(".")
    times = wait_js(
        page,
        "(() => { const t = [...document.querySelectorAll('video')].map(v => v.currentTime);"
        " return Math.abs(t[0] - t[1]) < 0.02 && !document.querySelector('video').seeking ? t : null })()",
    )
    assert times[0] == pytest.approx(times[1], abs=0.02)
    page.keyboard.press("ArrowRight")

    third = next_item(page, second["assignment"])
    assert third["modality"] == "text"
    page.keyboard.press("ArrowUp")
    wait_js(page, "document.body.dataset.state === 'empty'")
    wait_js(page, "window.__rl.pending === 0")

    # Undo the last judgment: the text comparison comes back; judge it 'both bad' instead.
    page.keyboard.press("u")
    wait_js(page, "document.body.dataset.state === 'ready'")
    assert shown(page)["assignment"] == third["assignment"]
    page.keyboard.press("4")
    wait_js(page, "document.body.dataset.state === 'empty'")
    wait_js(page, "window.__rl.pending === 0")

    judgments = {j.assignment_id: j for j in Judgment.objects.all()}
    assert len(judgments) == 3
    img = judgments[int(first["assignment"])]
    assert img.displayed_order == [first["left"], first["right"]]
    assert img.winner_id == first["left"]
    assert img.time_spent_ms > 0
    vid = judgments[int(second["assignment"])]
    assert vid.displayed_order == [second["left"], second["right"]]
    assert vid.winner_id == second["right"]
    txt = judgments[int(third["assignment"])]
    assert txt.displayed_order == [third["left"], third["right"]]
    assert (txt.outcome, txt.winner_id) == ("both_bad", None)
    assert page.inner_text("#rl-count").startswith("3 judged")
    assert page.errors == []


def test_untrusted_text_is_shown_as_text(
    browser: Any, live_server: Any, manager: Any, make_project: Any
) -> None:
    user = get_user_model().objects.create_user(username="xss", password="pw-xss")
    project = make_project("xss")
    services.project_member_set(project=project, actor=manager, user=user, role=ProjectMember.Role.ANNOTATOR)
    evil = [
        "Answer one <script>window.__pwned = 1; alert('script')</script> end",
        "Answer two <img src=x onerror=\"window.__pwned = 2; alert('img')\"> [click](javascript:alert(3))",
    ]
    res = services.sample_create_texts(
        project=project,
        actor=manager,
        items=[{"prompt": "<b>bold?</b> <script>alert(4)</script>", "text": t} for t in evil],
    )
    services.comparisons_create(
        project=project, actor=manager, specs=[{"samples": [r.sample.id for r in res]}]
    )

    page = login(browser, live_server, "xss")
    page.goto(f"{live_server.url}/label/xss/")
    wait_js(page, "document.body.dataset.state === 'ready'")
    time.sleep(0.5)  # give any injected handler the chance to run
    text = page.inner_text("#rl-stage")
    assert "<script>window.__pwned = 1; alert('script')</script>" in text
    assert "<img src=x onerror=" in text
    assert page.inner_text("#rl-prompt") == "<b>bold?</b> <script>alert(4)</script>"
    assert (
        page.evaluate("document.querySelectorAll('#rl-stage script, #rl-stage img, #rl-prompt *').length")
        == 0
    )
    assert page.evaluate(
        "[...document.querySelectorAll('#rl-stage a')].every(a => !a.href.startsWith('javascript'))"
    )
    assert page.evaluate("window.__pwned") is None
    assert page.dialogs == []
