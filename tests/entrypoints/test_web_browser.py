"""The web app in a real browser: `python app.py --demo` driven by headless Chromium (Playwright).

Needs Debian's Chromium (`apt-get install -y chromium`; on PATH, or $CHROMIUM): without it the tests
skip, saying so, and fail when MUGSTAN_REQUIRE names chromium (tests/outside_programs.py). The screenshot goes to the test's
temporary folder (tests never modify tracked files); `scripts/refresh_app_screenshot.py`
sets MUGSTAN_APP_SCREENSHOT to refresh docs/img/app.png from this test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from live_process import serve_app
from outside_programs import require

pytestmark = [pytest.mark.browser, pytest.mark.requires("chromium")]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000
STARTUP_TIMEOUT_S = 90


def _serve(tmp_path_factory, *flags: str):
    """`python app.py --demo FLAGS` on a free port, run from the repository root (the file route's worst case)."""
    yield from serve_app(tmp_path_factory.mktemp("app") / "app.log", "--demo", "--max-new-tokens", "24", *flags,
                         timeout_s=STARTUP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def selecting_server(tmp_path_factory):
    """The app choosing 2 of 8 candidate clips per question."""
    yield from _serve(tmp_path_factory, "--select", "2", "--candidates", "8", "--frames", "4")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require("chromium"), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 800})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _upload(page, path: Path) -> None:
    page.locator("#video input[type=file]").set_input_files(str(path))


def _ask(page, question: str) -> None:
    box = page.locator("#question textarea")
    box.fill(question)
    box.press("Enter")


def _bot_messages(page):
    return page.locator("#chatbot .message.bot")


def test_chat_in_browser(server, page, synthetic_videos, tmp_path):
    from playwright.sync_api import expect

    video = synthetic_videos(2, seed=7).videos[0][0]  # first frame shows the shape
    page.goto(server + "/")
    expect(page.locator("#notice")).to_contain_text("demo model")
    _upload(page, video)
    expect(page.locator("#video-status")).to_contain_text("visual tokens")
    _ask(page, "what happens in the video?")
    bot = _bot_messages(page)
    expect(bot.first).to_contain_text("first token", timeout=TIMEOUT_MS)  # stats follow the streamed answer
    answer = bot.first.inner_text()
    assert "visual tokens" in answer and "decode" in answer and len(answer.split()) > 10
    expect(page.locator("#question textarea")).to_have_value("")

    _ask(page, "and then?")
    expect(bot).to_have_count(2)
    expect(bot.nth(1)).to_contain_text("video features cached")
    expect(page.locator("#timeline figure.shown")).to_have_count(1)  # one uniform clip, shown

    # a new page is a new session: nothing of the previous conversation is visible
    page.goto(server + "/")
    expect(page.locator("#video-status")).to_contain_text("No video loaded")
    expect(_bot_messages(page)).to_have_count(0)
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video, just text\n" * 50)
    _upload(page, fake)
    expect(_bot_messages(page).last).to_contain_text("Cannot use this video", timeout=TIMEOUT_MS)
    expect(page.locator("#video-status")).to_contain_text("was not loaded")
    _ask(page, "what happens?")
    expect(_bot_messages(page).last).to_contain_text("Upload a video first")


def test_file_route_serves_only_uploads_and_examples(server, page):
    example = next((ROOT / "examples").glob("*.mp4"))
    assert page.request.get(f"{server}/gradio_api/file={example}").status == 200
    for path in ("/etc/passwd", ROOT / "pyproject.toml", ROOT / "app.py", ROOT / "mugstan_chat" / "llava" / "loader.py"):
        response = page.request.get(f"{server}/gradio_api/file={path}")
        assert response.status != 200, f"{path} must not be served"


def test_timeline_marks_the_selected_clips(selecting_server, page, tmp_path):
    """A 30-second video of six coloured segments; each answer says which 2 of 8 clips (and times) it used."""
    from playwright.sync_api import expect

    from mugstan_chat.video import write_video

    colours = [(220, 40, 40), (40, 190, 70), (50, 80, 230), (235, 215, 50), (235, 235, 235), (160, 60, 200)]
    video = tmp_path / "segments.mp4"
    write_video(video, [np.full((96, 128, 3), c, dtype=np.uint8) for c in colours for _ in range(40)], fps=8)
    page.goto(selecting_server + "/")
    _upload(page, video)
    expect(page.locator("#video-status")).to_contain_text("2 of 8 candidate clips chosen per question")
    strip = page.locator("#timeline figure")
    expect(strip).to_have_count(8)
    expect(page.locator("#timeline")).to_contain_text("each question chooses 2")
    _ask(page, "what happens after the green part?")
    bot = _bot_messages(page)
    expect(bot.first).to_contain_text("first token", timeout=TIMEOUT_MS)
    expect(bot.first).to_contain_text("2 of 8 candidates chosen")
    expect(page.locator("#timeline figure.shown")).to_have_count(2)
    expect(page.locator("#timeline")).to_contain_text("2 of 8 candidates chosen for the last question")
    times = page.locator("#timeline figure.shown figcaption").all_inner_texts()
    assert all("–" in t for t in times) and times == sorted(times)
    assert all(t in bot.first.inner_text() for t in times)  # the answer names the same clips and times
    # each time under the answer links to its moment: clicking it seeks the player there
    links = bot.first.locator('a[href*="#t="]')
    expect(links).to_have_count(2)
    target = float(links.nth(1).get_attribute("href").split("#t=")[1])
    assert target > 0
    links.nth(1).click()
    player = page.locator("#video video")
    page.wait_for_function("([el, t]) => Math.abs(el.currentTime - t) < 0.05", arg=[player.element_handle(), target])
    assert page.url.endswith("/")  # the anchor was not followed
    screenshot = Path(os.environ.get("MUGSTAN_APP_SCREENSHOT") or tmp_path / "app.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 0
