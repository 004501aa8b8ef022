"""Progress bars by one rule (mugstan_chat.entrypoints.progress): on stderr when it is a terminal, off with
--no-progress or when stderr is a pipe or file; each long command (eval, synthetic, mugstan-evaluate) uses it."""

from __future__ import annotations

import io
import sys

import pytest

from mugstan_chat.entrypoints.cli import main as cli_main
from mugstan_chat.entrypoints.progress import progress_bar
from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.synthetic import make_synthetic_mc
from mugstan_chat.synthetic.cli import main as synthetic_main

from mugstan_train.evaluate import main as evaluate_main
from mugstan_train.params import model_config


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _bar_output(enabled: bool, stream) -> str:
    with progress_bar(enabled, total=3, desc="work", file=stream) as bar:
        bar.update(3)
    return stream.getvalue()


def test_the_rule_terminal_only_and_never_when_turned_off():
    assert "work: 100%" in _bar_output(True, Terminal()) and "3/3" in _bar_output(True, Terminal())
    assert _bar_output(True, io.StringIO()) == ""  # a pipe or a log file: nothing
    assert _bar_output(False, Terminal()) == ""  # --no-progress


def _terminal(monkeypatch) -> Terminal:
    """sys.stderr as a terminal, set in the test's body (pytest's capture resets it between fixture and call)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.mark.parametrize("command, total", [(["videos", "--num", "4"], 4), (["questions", "--num", "2"], 2),
                                            (["reversal", "--pairs-per-family", "1", "--families", "pan"], 2)])
def test_synthetic_shows_a_bar_on_a_terminal(tmp_path, monkeypatch, command, total):
    terminal = _terminal(monkeypatch)
    argv = [command[0], str(tmp_path / "on"), *command[1:], "--size", "16", "--frames", "4"]
    assert synthetic_main(argv) == 0
    assert "videos: 100%" in terminal.getvalue() and f"{total}/{total}" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    argv[1] = str(tmp_path / "off")
    assert synthetic_main(argv + ["--no-progress"]) == 0
    assert "videos:" not in terminal.getvalue()


def test_synthetic_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert synthetic_main(["videos", str(tmp_path), "--num", "2", "--size", "16", "--frames", "4"]) == 0
    assert "videos:" not in capsys.readouterr().err


def test_evaluate_retrieval_and_recognition_show_the_encoding_bar(synthetic_videos, tmp_path, monkeypatch):
    terminal = _terminal(monkeypatch)
    videos = synthetic_videos(4, seed=0, size=32, frames=6).folder
    MugStan(model_config("tiny", stan_layers=1)).save_pretrained(tmp_path / "ckpt")
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--video-root", str(videos), "--frames", "2",
              "--workers", "0", "--batch-size", "3"]
    assert evaluate_main([*common, "--data", str(videos / "annotations.csv")]) == 0
    assert "encode: 100%" in terminal.getvalue() and "4/4" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    labels = tmp_path / "labels.csv"
    labels.write_text("video,label\n" + "".join(f"pair{i // 2:04d}_{'ab'[i % 2]}.mp4,{i % 2}\n" for i in range(4)))
    (tmp_path / "classes.txt").write_text("left\nright\n")
    recognition = [*common, "--task", "recognition", "--data", str(labels), "--class-names", str(tmp_path / "classes.txt")]
    assert evaluate_main(recognition) == 0
    assert "encode: 100%" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert evaluate_main(recognition + ["--no-progress"]) == 0
    assert "encode:" not in terminal.getvalue()


def test_eval_uses_the_same_rule(tmp_path, monkeypatch):
    terminal = _terminal(monkeypatch)
    questions = make_synthetic_mc(tmp_path / "mc", num=2, seed=0, size=32, frames=6)
    argv = ["eval", str(questions), "--video-root", str(tmp_path / "mc"), "--demo", "--answer-format", "text",
            "--frames", "2", "--modes", "mean", "--bootstrap", "10"]
    assert cli_main(argv + ["--out", str(tmp_path / "on")]) == 0
    assert "eval: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert cli_main(argv + ["--out", str(tmp_path / "off"), "--no-progress"]) == 0
    assert "eval:" not in terminal.getvalue()
