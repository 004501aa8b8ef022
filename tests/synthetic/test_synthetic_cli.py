"""``python -m mugstan_chat.synthetic``: each subcommand writes what its library call writes; bad arguments exit 2."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from mugstan_chat.synthetic import make_synthetic_mc, make_synthetic_videos, make_time_reversal_dataset
from mugstan_chat.synthetic.cli import main


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_videos_writes_the_plain_set(tmp_path, capsys):
    assert main(["videos", str(tmp_path / "cli"), "--num", "4", "--seed", "2", "--size", "32", "--frames", "8"]) == 0
    assert "wrote 4 videos" in capsys.readouterr().out
    make_synthetic_videos(tmp_path / "lib", 4, seed=2, size=32, frames=8)
    assert _files(tmp_path / "cli") == _files(tmp_path / "lib")


def test_questions_writes_the_videos_and_the_question_file(tmp_path):
    assert main(["questions", str(tmp_path / "cli"), "--num", "2", "--seed", "1", "--size", "32", "--frames", "8"]) == 0
    make_synthetic_mc(tmp_path / "lib", 2, seed=1, size=32, frames=8)
    assert _files(tmp_path / "cli") == _files(tmp_path / "lib")
    assert "questions.jsonl" in _files(tmp_path / "cli")


def test_reversal_writes_the_chosen_families(tmp_path):
    argv = ["reversal", str(tmp_path / "cli"), "--pairs-per-family", "1", "--families", "pan", "count",
            "--seed", "4", "--size", "32", "--frames", "6"]
    assert main(argv) == 0
    make_time_reversal_dataset(tmp_path / "lib", 1, seed=4, families=("pan", "count"), size=32, frames=6)
    assert _files(tmp_path / "cli") == _files(tmp_path / "lib")
    rows = list(csv.DictReader(open(tmp_path / "cli" / "annotations.csv")))
    assert [row["family"] for row in rows] == ["pan", "pan", "count", "count"]


@pytest.mark.parametrize("argv, argument", [
    (["videos", "OUT", "--num", "3"], "--num"),
    (["questions", "OUT", "--num", "0"], "--num"),
    (["videos", "OUT", "--size", "33"], "--size"),
    (["videos", "OUT", "--frames", "x"], "--frames"),
    (["reversal", "OUT", "--pairs-per-family", "0"], "--pairs-per-family"),
    (["reversal", "OUT", "--families", "teleport"], "--families"),
    (["reversal", "OUT", "--seed", "1.5"], "--seed"),
    (["paint", "OUT"], "argument COMMAND: invalid choice"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, monkeypatch, capsys, argv, argument):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert argument in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()  # nothing written


def test_runs_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mugstan_chat.synthetic", "videos", str(tmp_path), "--num", "2",
                           "--size", "16", "--frames", "4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["annotations.csv", "pair0000_a.mp4",
                                                                "pair0000_b.mp4"]
