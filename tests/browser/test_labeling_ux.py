"""What a new annotator or manager meets on the labeling page: phone layout, the running total,
the end screen, stuck work and zoom. Real headless Chromium, driven by keyboard and clicks."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from annotate import services
from annotate.models import Judgment, ProjectMember
from tests.browser.test_labeling import CHROMIUM_ARGS, next_item, shown, wait_js
from tests.factories import png_bytes

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

PHONE = {"width": 390, "height": 844}
TABLET = {"width": 768, "height": 1024}
DESKTOP = {"width": 1280, "height": 800}


# Same as tests/browser/test_labeling.py:browser (a module-scoped fixture is not shared anyway).
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def login(browser: Any, live_server: Any, username: str, viewport: dict[str, int] = DESKTOP) -> Any:
    page = browser.new_page(viewport=viewport)
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", "pw-" + username)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(f"{live_server.url}/")
    return page


def open_label(page: Any, live_server: Any, slug: str, state: str = "ready") -> None:
    page.goto(f"{live_server.url}/label/{slug}/")
    wait_js(page, f"document.body.dataset.state === '{state}'")


def settle(page: Any) -> None:
    """Every judgment posted and the progress refresh it triggered answered."""
    wait_js(page, "window.__rl.pending === 0")
    time.sleep(0.3)


def next_unseen(page: Any, seen: set[str]) -> str:
    """Wait until an assignment not in ``seen`` is on screen; its id, added to ``seen``."""
    listed = ",".join(f"'{a}'" for a in seen)
    assignment = str(
        wait_js(
            page,
            "document.body.dataset.state === 'ready'"
            f" && ![{listed}].includes(document.getElementById('rl-stage').dataset.assignment)"
            " && document.getElementById('rl-stage').dataset.assignment",
        )
    )
    seen.add(assignment)
    return assignment


def total_text(page: Any) -> str:
    return str(page.inner_text("#rl-total"))


def rects(page: Any, selector: str) -> list[dict[str, float]]:
    return list(
        page.evaluate(
            f"""[...document.querySelectorAll('{selector}')].filter(e => e.offsetParent !== null).map(e => {{
            const r = e.getBoundingClientRect();
            return {{left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width, height: r.height}};
        }})"""
        )
    )


@pytest.fixture
def ann_project(
    make_user: Callable[..., Any], make_project: Any, text_pairs: Callable[..., list[int]]
) -> Any:
    ann = make_user("ann")
    project = make_project("ux", annotators=(ann,))
    text_pairs(project, n=4)
    return project


# --- 1: phones and tablets ---------------------------------------------------------------------------
@pytest.mark.parametrize("viewport", [PHONE, TABLET], ids=["phone", "tablet"])
def test_small_screens_fit_and_keep_every_control_reachable(
    browser: Any, live_server: Any, ann_project: Any, viewport: dict[str, int]
) -> None:
    width, height = viewport["width"], viewport["height"]
    page = login(browser, live_server, "ann", viewport)
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # the home page too
    open_label(page, live_server, "ux")

    assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert page.evaluate("document.documentElement.scrollHeight") <= height
    left, right = rects(page, ".rl-panel")
    if width < 720:  # phones: stacked, A above B, full width
        assert left["bottom"] <= right["top"]
        assert left["left"] == right["left"] and left["width"] == right["width"] >= width - 20
        assert left["height"] == right["height"] >= 200
    else:  # a portrait tablet still has room for two columns
        assert left["right"] <= right["left"]
        assert left["top"] == right["top"] and left["width"] == right["width"] >= 340
    assert right["bottom"] <= height

    choices = rects(page, ".rl-choice")
    assert len(choices) == 4  # A, tie, both bad, B: all shown
    others = rects(page, ".rl-meta .rl-button")
    assert len(others) == 3  # skip, undo, help
    for box in choices + others:
        assert box["height"] >= 44
        assert box["left"] >= 0 and box["right"] <= width
        assert box["top"] >= 0 and box["bottom"] <= height
    assert all(box["width"] >= 44 for box in choices)

    # The keys still work, and so does a tap on a button.
    first = shown(page)
    page.keyboard.press("ArrowLeft")
    second = next_item(page, first["assignment"])
    page.click(".rl-choice[data-choice='right']")
    third = next_item(page, second["assignment"])
    page.keyboard.press("s")
    fourth = next_item(page, third["assignment"])
    page.keyboard.press("ArrowUp")
    wait_js(page, "document.body.dataset.state === 'empty'")
    settle(page)
    got = {j.assignment_id: (j.outcome, j.winner_id) for j in Judgment.objects.all()}
    assert got == {
        int(first["assignment"]): ("a" if first["left"] < first["right"] else "b", first["left"]),
        int(second["assignment"]): ("a" if second["right"] < second["left"] else "b", second["right"]),
        int(fourth["assignment"]): ("tie", None),
    }
    # The end screen fits as well, its buttons are touch targets.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for box in rects(page, ".rl-done-actions .rl-button"):
        assert box["height"] >= 44 and box["right"] <= width
    assert page.errors == []


def test_wide_screens_keep_the_outputs_side_by_side(browser: Any, live_server: Any, ann_project: Any) -> None:
    page = login(browser, live_server, "ann")
    open_label(page, live_server, "ux")
    left, right = rects(page, ".rl-panel")
    assert left["right"] <= right["left"]
    assert left["top"] == right["top"]
    assert page.evaluate("document.documentElement.scrollWidth") <= DESKTOP["width"]


# --- 2 and 3: the running total and the end screen ---------------------------------------------------
def test_total_follows_every_judgment_and_the_end_screen_sums_up(
    browser: Any, live_server: Any, ann_project: Any, manager: Any
) -> None:
    ann = ProjectMember.objects.get(project=ann_project, role=ProjectMember.Role.ANNOTATOR).user
    # Two judgments from an earlier session.
    for lease in services.assignment_next(project=ann_project, annotator=ann, n=2):
        services.judgment_submit(project=ann_project, annotator=ann, assignment_id=lease.id, choice="left")

    page = login(browser, live_server, "ann")
    open_label(page, live_server, "ux")
    wait_js(page, "document.getElementById('rl-total').textContent !== ''")
    assert total_text(page) == " · 2 in total"
    for n, key in ((3, "ArrowLeft"), (4, "ArrowRight")):
        page.keyboard.press(key)
        settle(page)
        assert Judgment.objects.filter(annotator=ann).count() == n
        assert total_text(page) == f" · {n} in total"
    wait_js(page, "document.body.dataset.state === 'empty'")

    # The end screen: the counts, a way home and "check again"; no empty prompt box.
    assert page.is_visible("#rl-done")
    assert not page.is_visible("#rl-prompt")
    assert not page.is_visible("#rl-message")
    assert page.inner_text(".rl-done-summary") == "You judged 2 this session, 4 in total."
    assert not page.is_visible("#rl-done-stuck")  # annotators are not told about stuck work

    # Undo from the end screen takes both numbers back.
    page.keyboard.press("u")
    wait_js(page, "document.body.dataset.state === 'ready'")
    assert page.inner_text("#rl-count") == "1 judged this session"
    assert total_text(page) == " · 3 in total"
    page.keyboard.press("2")
    wait_js(page, "document.body.dataset.state === 'empty'")
    settle(page)
    assert page.inner_text(".rl-done-summary") == "You judged 2 this session, 4 in total."
    assert Judgment.objects.filter(annotator=ann).count() == 4

    # New work shows up at once on "check again" (the background poll waits 10 s).
    fresh = services.sample_create_texts(
        project=ann_project, actor=manager, items=[{"prompt": "late", "text": t} for t in ("new A", "new B")]
    )
    (late,) = services.comparisons_create(
        project=ann_project, actor=manager, specs=[{"samples": [r.sample.id for r in fresh]}]
    )
    started = time.monotonic()
    page.click("[data-action='check-again']")
    wait_js(page, "document.body.dataset.state === 'ready'", timeout=5)
    assert time.monotonic() - started < 5
    assert int(page.evaluate("window.__rl.current")) > 0
    assert shown(page)["prompt"] == "late"
    page.keyboard.press("ArrowLeft")
    wait_js(page, "document.body.dataset.state === 'empty'")
    settle(page)
    assert Judgment.objects.filter(annotator=ann, comparison_id=late.id).count() == 1
    assert page.inner_text(".rl-done-summary") == "You judged 3 this session, 5 in total."
    assert total_text(page) == " · 5 in total"

    # "R" checks again too; with nothing new the end screen comes back.
    page.keyboard.press("r")
    wait_js(page, "document.body.dataset.state === 'empty'")
    page.click("#rl-done a[href='/']")
    page.wait_for_url(f"{live_server.url}/")
    assert page.inner_text(".rl-project-link") == "UX"
    assert page.errors == []


# --- 4: stuck work, shown to the manager ----------------------------------------------------------------
def test_the_manager_is_told_about_comparisons_every_annotator_skipped(
    browser: Any, live_server: Any, ann_project: Any, manager: Any
) -> None:
    ann = ProjectMember.objects.get(project=ann_project, role=ProjectMember.Role.ANNOTATOR).user
    page = login(browser, live_server, "ann")
    open_label(page, live_server, "ux")
    seen: set[str] = set()
    for _ in range(4):
        next_unseen(page, seen)
        page.keyboard.press("s")
    wait_js(page, "document.body.dataset.state === 'empty'")
    settle(page)
    assert not page.is_visible("#rl-done-stuck")
    assert page.inner_text(".rl-done-summary") == "You judged 0 this session, 0 in total."

    # The manager skipped them too (or never labels): their end screen and home page say so.
    for lease in services.assignment_next(project=ann_project, annotator=manager, n=20):
        services.assignment_skip(project=ann_project, annotator=manager, assignment_id=lease.id)
    mpage = login(browser, live_server, "manager")
    assert mpage.inner_text(".rl-tag-warn") == "4 stuck"
    open_label(mpage, live_server, "ux", state="empty")
    wait_js(mpage, "!document.getElementById('rl-done-stuck').hidden")
    assert mpage.inner_text("#rl-done-stuck") == (
        "4 comparisons were skipped by every active annotator and will not be served again"
        " until more annotators join."
    )
    assert ann.assignments.filter(status="skipped").count() == 4
    assert mpage.errors == [] and page.errors == []


# --- 5: zoom at the file's own resolution ---------------------------------------------------------------
def test_zoom_shows_natural_size_and_pans_a_big_image(
    browser: Any, live_server: Any, make_user: Callable[..., Any], manager: Any, make_project: Any
) -> None:
    ann = make_user("zoomer")
    project = make_project("zoom", annotators=(ann,), modality="image")
    small, big = (
        services.sample_create_media(
            project=project, actor=manager, file=io.BytesIO(png_bytes(color, size)), filename=name, prompt="p"
        ).sample.id
        for color, size, name in (
            ((200, 30, 30), (384, 384), "s.png"),
            ((30, 30, 200), (2000, 1500), "b.png"),
        )
    )
    services.comparisons_create(project=project, actor=manager, specs=[{"samples": [small, big]}])
    page = login(browser, live_server, "zoomer")
    open_label(page, live_server, "zoom")
    side = {shown(page)["left"]: "left", shown(page)["right"]: "right"}

    def zoomed() -> dict[str, Any]:
        return dict(
            page.evaluate(
                """(() => { const z = document.getElementById('rl-zoom');
                const r = document.getElementById('rl-zoom-img').getBoundingClientRect();
                return {w: r.width, h: r.height, left: r.left, top: r.top, right: r.right, bottom: r.bottom,
                        sw: z.scrollWidth, sh: z.scrollHeight, cw: z.clientWidth, ch: z.clientHeight}; })()"""
            )
        )

    page.click(f".rl-panel[data-side={side[small]}] img")
    assert page.is_visible("#rl-zoom")
    z = zoomed()
    assert (z["w"], z["h"]) == (384, 384)  # not blown up to the panel or beyond
    assert (z["sw"], z["sh"]) == (z["cw"], z["ch"])  # nothing to scroll
    assert z["left"] == (z["cw"] - 384) / 2 and z["top"] == (z["ch"] - 384) / 2  # centred
    page.keyboard.press("Escape")
    assert not page.is_visible("#rl-zoom")

    page.click(f".rl-panel[data-side={side[big]}] img")
    z = zoomed()
    assert (z["w"], z["h"]) == (2000, 1500)
    assert (z["sw"], z["sh"]) == (2000, 1500)  # every pixel reachable by scrolling
    page.evaluate(
        "(() => { const z = document.getElementById('rl-zoom'); z.scrollLeft = 0; z.scrollTop = 0; })()"
    )
    z = zoomed()
    assert (z["left"], z["top"]) == (0, 0)  # the top-left corner is not cut off
    page.evaluate(
        "(() => { const z = document.getElementById('rl-zoom'); z.scrollLeft = 1e6; z.scrollTop = 1e6; })()"
    )
    z = zoomed()
    assert (z["right"], z["bottom"]) == (z["cw"], z["ch"])  # nor the bottom-right one
    # Dragging pans.
    page.evaluate(
        "(() => { const z = document.getElementById('rl-zoom'); z.scrollLeft = 500; z.scrollTop = 300; })()"
    )
    page.mouse.move(600, 400)
    page.mouse.down()
    page.mouse.move(500, 350, steps=4)
    page.mouse.up()
    assert page.evaluate(
        "[document.getElementById('rl-zoom').scrollLeft, document.getElementById('rl-zoom').scrollTop]"
    ) == [600, 350]
    assert page.is_visible("#rl-zoom")  # a drag is not a click
    page.mouse.click(600, 400)
    assert not page.is_visible("#rl-zoom")
    assert page.errors == []
