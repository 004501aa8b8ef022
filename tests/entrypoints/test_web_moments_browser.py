"""The web app in Chromium: a time in an answer is a link, and clicking it seeks the player there.

The demo model's random answers never name a time, so the app runs with its answers replaced by a
fixed text that does (after the model's own tokens ran: timings and stats stay real); everything
else (the page, the clip times in the prompt, the references, the links, the player) is the app's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from live_process import serve_app
from mugstan_chat.video import write_video
from outside_programs import require

pytestmark = [pytest.mark.browser, pytest.mark.requires("chromium")]

ROOT = Path(__file__).resolve().parents[2]
ANSWER = "The square turns green at 00:04, and in Clip 1 it is still red."
LAUNCH = f"""
import sys
import app
from mugstan_chat.engine.conversation import ChatSession

real = ChatSession.ask_stream

def naming_times(self, question, stop=None, generation=None):
    for _ in real(self, question, stop=stop, generation=generation):
        pass
    yield {ANSWER!r}

ChatSession.ask_stream = naming_times
raise SystemExit(app.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    yield from serve_app(tmp_path_factory.mktemp("app") / "app.log", "--demo", "--clips", "3", "--frames", "2",
                         "--max-new-tokens", "4", "--no-examples", launcher=("-c", LAUNCH))


def test_a_time_in_the_answer_seeks_the_player(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    video = tmp_path / "colours.mp4"  # 9 s: red, green, blue thirds
    colours = [(220, 40, 40), (40, 190, 70), (50, 80, 230)]
    write_video(video, [np.full((64, 64, 3), c, dtype=np.uint8) for c in colours for _ in range(24)], fps=8)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require("chromium"), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(app_url + "/")
            page.locator("#video input[type=file]").set_input_files(str(video))
            expect(page.locator("#video-status")).to_contain_text("visual tokens")
            box = page.locator("#question textarea")
            box.fill("when does it turn green?")
            box.press("Enter")
            answer = page.locator("#chatbot .message.bot").first
            expect(answer).to_contain_text("first token")
            time_link = answer.locator('a[href*="#t="]', has_text="00:04")
            clip_link = answer.locator('a[href*="#t="]', has_text="Clip 1")
            expect(time_link).to_have_count(1)
            expect(clip_link).to_have_count(1)
            assert time_link.get_attribute("href").endswith("#t=4.000")
            player = page.locator("#video video")
            time_link.click()
            page.wait_for_function("el => Math.abs(el.currentTime - 4.0) < 0.05", arg=player.element_handle())
            clip_start = float(clip_link.get_attribute("href").split("#t=")[1])
            clip_link.click()
            page.wait_for_function("([el, t]) => Math.abs(el.currentTime - t) < 0.05",
                                   arg=[player.element_handle(), clip_start])
            assert page.url == app_url + "/"  # the anchors were not followed
        finally:
            browser.close()
