"""``mugstan-chat`` end to end on the offline demo model: ask, --json, chat, errors and exit codes."""

import io
import json
import os
import subprocess
import sys

import pytest

from mugstan_chat.entrypoints.cli import main
from mugstan_chat.llava.demo import save_demo_branch

FAST = ["--demo", "--frames", "4", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def video(synthetic_videos):
    return str(synthetic_videos(2, seed=1, size=64, frames=16).videos[0][0])


def test_ask_demo_streams_an_answer(video, capsys):
    assert main(["ask", video, "what happens?", *FAST]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and len(out.strip().split()) >= 2
    assert "meaningless" in err  # the demo says what its answers are worth


def test_ask_json_has_answer_settings_and_timings(video, capsys):
    assert main(["ask", video, "what happens?", *FAST, "--clips", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] and result["model"] == "demo" and result["temporal"] == "stan"
    assert (result["frames"], result["clips"]) == (4, 2)
    assert result["visual_tokens"] == 2 * 16 and result["prompt_tokens"] > result["visual_tokens"]
    timings = result["timings_ms"]
    assert set(timings) == {"decode", "encode", "first_token", "total"}
    assert all(timings[key] > 0 for key in timings)
    assert timings["total"] >= timings["first_token"]
    assert "meaningless" in result["notice"]


@pytest.mark.slow
def test_ask_as_a_real_subprocess(video):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mugstan_chat.entrypoints.cli", "ask", video, "what happens?", *FAST,
                           "--temporal", "mean"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_missing_video_is_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "absent.mp4"
    assert main(["ask", str(missing), "what happens?", "--demo"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "absent.mp4" in err


def test_corrupt_video_is_one_line_and_exit_1(tmp_path, capfd):
    corrupt = tmp_path / "notes.mp4"
    corrupt.write_text("this is a text file, not a video\n")
    assert main(["ask", str(corrupt), "what happens?", "--demo"]) == 1
    out, err = capfd.readouterr()  # file-descriptor level: native decoder noise would show up here
    assert out == "" and err.count("\n") == 1 and "notes.mp4" in err


def test_chat_answers_questions_from_stdin(video, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what happens?\n/reset\nwhy does it move?\n"))
    assert main(["chat", video, *FAST]) == 0
    out, err = capsys.readouterr()
    answers = [line for line in out.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 2 and all(len(a) > len("assistant> ") for a in answers)
    assert "conversation cleared" in err


def test_branch_resolution_mismatch_needs_the_override(video, tmp_path, capsys):
    branch = save_demo_branch(tmp_path / "branch64", image_size=64)
    assert main(["ask", video, "what happens?", *FAST, "--stan", branch]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "image_size" in err
    assert main(["ask", video, "what happens?", *FAST, "--stan", branch, "--allow-resolution-mismatch"]) == 0
    assert "domain shift" in capsys.readouterr().err


def test_usage_errors_exit_2(video):
    for argv in ([], ["ask", video], ["ask", video, "q", "--frames", "0"],
                 ["ask", video, "q", "--load-4bit", "--load-8bit"], ["ask", video, "q", "--temporal", "max"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["ask", str(tmp_path / "absent.mp4"), "q", "--demo", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_ask_json_reports_spans_and_the_selection(video, capsys):
    assert main(["ask", video, "what happens?", *FAST, "--select", "2", "--candidates", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    spans, selection = result["clip_spans"], result["selection"]
    assert result["clips"] == 2 and [s["number"] for s in spans] == [1, 2]
    assert [s["candidate"] for s in spans] == selection["chosen"] and selection["candidates"] == 4
    assert all(list(selection["candidate_spans"][s["candidate"]]) == [s["start"], s["end"]] for s in spans)
    assert selection["tokens_saved"] == 2 * 16 and selection["rank_ms"] > 0 and selection["embed_ms"] > 0
    assert main(["ask", video, "what happens?", *FAST, "--clips", "auto", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clips_auto"] and result["clips"] == len(result["clip_spans"]) == 4  # 16 frames, T = 4


def test_chat_verbose_prints_the_clips_each_answer_used(video, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what happens?\nwhat moves?\n"))
    assert main(["chat", video, *FAST, "--select", "1", "--candidates", "3", "--verbose"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("clips: 1 ")]
    assert len(lines) == 2 and "of 3 candidates" in lines[0] and "candidates from the cache" in lines[1]
