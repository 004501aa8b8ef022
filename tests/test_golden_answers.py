"""Every front end answers as recorded in ``tests/fixtures/golden_answers.json`` (demo model, greedy).

``ask``, ``chat``, the API server (whole and streamed), the web app and ``eval`` are asked again through
their public interfaces only (subprocesses, HTTP: ``tests/golden.py``, the same code that recorded them with
``scripts/record_golden_answers.py``), so a refactor that moves modules cannot break the comparison itself.
Front ends given the same settings and conversation also agree with each other: checked on the recording,
which every live answer must equal.
"""

from __future__ import annotations

import json
import math

import pytest

import golden

pytestmark = pytest.mark.slow

RECORDED = json.loads(golden.GOLDEN.read_text())
ANSWERS = RECORDED["answers"]
HINT = ("; if the answer is meant to change, re-record (scripts/record_golden_answers.py --overwrite) and "
        "say why in the commit")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return golden.make_video(tmp_path_factory.mktemp("golden_videos"))


@pytest.fixture(scope="module")
def server(video, tmp_path_factory):
    with golden.serve(tmp_path_factory.mktemp("golden_server") / "server.log", video.parent) as base:
        yield base


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    yield from golden.serve_app(tmp_path_factory.mktemp("golden_app") / "app.log")


def _recorded(front_end: str) -> list[str]:
    return list(ANSWERS[front_end].values())


def test_recording_matches_this_setup(video):
    """The video is byte-identical and the settings and questions are those recorded (else nothing compares)."""
    assert golden.sha256(video) == RECORDED["video"]["sha256"], "the synthetic video generator writes other bytes"
    assert RECORDED["settings"] == golden.SETTINGS and RECORDED["questions"] == list(golden.QUESTIONS)
    assert RECORDED["eval_settings"] == golden.EVAL_SETTINGS
    assert all(answer for asked in ANSWERS.values() for answer in asked.values())  # visible text, every one


def test_front_ends_with_the_same_settings_agree():
    """ask == chat's first answer == the server's (whole, streamed) == the app's; the second turns agree too."""
    first, second = golden.QUESTIONS
    assert len({ANSWERS[f][first] for f in ("ask", "chat", "serve", "serve_stream", "app")}) == 1, ANSWERS
    assert len({ANSWERS[f][second] for f in ("chat", "serve", "serve_stream", "app")}) == 1, ANSWERS


def test_ask(video):
    assert [golden.ask_answer(video)] == _recorded("ask"), "ask" + HINT


def test_chat(video):
    assert golden.chat_answers(video) == _recorded("chat"), "chat" + HINT


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_serve(server, video, stream):
    front_end = "serve_stream" if stream else "serve"
    assert golden.serve_answers(server, video, stream=stream) == _recorded(front_end), front_end + HINT


def test_app(app_url, video):
    assert golden.app_answers(app_url, video) == _recorded("app"), "app" + HINT


def test_eval(video, tmp_path):
    """The same choices and accuracies; option scores to 1e-4 (they differ by fp32 noise between CPUs only;
    the recorded best and second-best options are > 9% apart)."""
    results = golden.eval_results(video.parent, tmp_path / "eval")
    recorded = RECORDED["eval"]
    assert set(results) == set(recorded)
    for mode, got in results.items():
        assert got["accuracy"] == recorded[mode]["accuracy"], mode + HINT
        assert set(got["questions"]) == set(recorded[mode]["questions"])
        for qid, result in got["questions"].items():
            expected = recorded[mode]["questions"][qid]
            assert (result["chosen"], result["correct"]) == (expected["chosen"], expected["correct"]), (mode, qid)
            assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in
                       zip(result["option_scores"], expected["option_scores"], strict=True)), (mode, qid)

