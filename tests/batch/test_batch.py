"""``mugstan-chat batch``: one row per video, named errors, resume after a kill, shards that split the input.

The demo model answers; 40 synthetic videos, three of them corrupt (garbage bytes, an empty file, a
truncated mp4). Runs that must survive a kill run as a subprocess and are killed for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mugstan_chat.entrypoints import cli
from mugstan_chat.batch.inputs import BatchItem, read_items, shard_items, this_shard
from mugstan_chat.batch.results import ResultsFile
from mugstan_chat.entrypoints import ModelArgs
from mugstan_chat.synthetic import make_synthetic_videos

FAST = ["--demo", "--frames", "2", "--max-new-tokens", "4", "--no-progress"]
PROMPT = "Describe the video."
CORRUPT = ("zz_garbage.mp4", "zz_empty.mp4", "zz_truncated.mp4")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 videos: 37 synthetic ones and 3 that cannot be decoded."""
    root = tmp_path_factory.mktemp("batch") / "videos"
    made = make_synthetic_videos(root, num=38, seed=3, size=32, frames=8)
    (root / "annotations.csv").unlink()
    made[-1][0].unlink()  # 37 good ones left
    (root / CORRUPT[0]).write_bytes(os.urandom(4096))
    (root / CORRUPT[1]).write_bytes(b"")
    (root / CORRUPT[2]).write_bytes(made[0][0].read_bytes()[:600])
    assert len(read_items(str(root))) == 40
    return root


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["batch", *argv])
    return code, capsys.readouterr().err


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_video_gets_a_row_and_bad_ones_a_named_error(folder, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    code, err = _run([str(folder), "--prompt", PROMPT, "--out", str(out), *FAST], capsys)
    assert code == 0, err
    rows = _rows(out)
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    failed = {r["id"]: r["error"] for r in rows if r["error"] is not None}
    assert sorted(failed) == sorted(CORRUPT)
    assert all(e["reason"] == "decode_error" and e["message"] for e in failed.values())
    answered = [r for r in rows if r["error"] is None]
    assert len(answered) == 37 and all(r["answer"] == r["caption"] and r["clip_spans"] for r in answered)
    assert all(r["timings_ms"]["total"] > 0 and r["question"] == PROMPT for r in answered)
    assert "37 answered, 3 failed (decode_error 3), 0 already done, of 40" in err
    # the same command again: nothing to do, nothing duplicated
    code, err = _run([str(folder), "--prompt", PROMPT, "--out", str(out), *FAST], capsys)
    assert code == 0 and "0 answered, 0 failed (none), 40 already done" in err
    assert _rows(out) == rows


def test_a_killed_run_continues_where_it_stopped(folder, tmp_path):
    """SIGKILL after some rows (and a torn last line), then the same command: 40 rows, no id twice."""
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, "-m", "mugstan_chat.entrypoints.cli", "batch", str(folder), "--prompt", PROMPT, "--out", str(out),
               *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and len(out.read_bytes().splitlines()) >= 12:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    before = _rows(out)
    assert 12 <= len(before) < 40, "the run was not stopped halfway"
    with open(out, "ab") as handle:
        handle.write(b'{"id": "torn')  # a write the kill cut short
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = _rows(out)
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    assert rows[:len(before)] == before  # finished rows are kept as they were
    assert f"{len(before)} already done, of 40" in again.stderr
    assert sorted(r["id"] for r in rows if r["error"]) == sorted(CORRUPT)


def test_shards_split_the_input_exactly(folder, monkeypatch):
    items = read_items(str(folder))
    for n in (2, 3, 7):
        parts = [shard_items(items, (i, n)) for i in range(n)]
        ids = [item.id for part in parts for item in part]
        assert sorted(ids) == sorted(i.id for i in items) and len(ids) == len(set(ids))
    assert this_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert this_shard(None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)
    assert this_shard((0, 2), {"RANK": "1", "WORLD_SIZE": "2"}) == (0, 2)  # --shard wins
    assert this_shard(None, {}) == (0, 1)


def test_two_shards_of_a_run_cover_every_video_once(folder, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    for item in read_items(str(folder))[:6]:
        (small / Path(item.video).name).write_bytes(Path(item.video).read_bytes())
    outs = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        code, err = _run([str(small), "--prompt", PROMPT, "--out", str(out), "--shard", f"{i}/2", *FAST], capsys)
        assert code == 0, err
    ids = [row["id"] for out in outs for row in _rows(out)]
    assert sorted(ids) == sorted(p.name for p in small.iterdir()) and len(ids) == 6


def test_greedy_rows_equal_asks_answers(folder, tmp_path, capsys):
    videos = sorted(folder.glob("pair000[0-1]_*.mp4"))
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"id": f"v{i}", "video": str(v), "question": f"what moves in {i}?"}) + "\n"
                               for i, v in enumerate(videos)))
    out = tmp_path / "rows.jsonl"
    code, err = _run([str(listing), "--prompt", PROMPT, "--out", str(out), "--clips", "2", *FAST], capsys)
    assert code == 0, err
    rows = {row["id"]: row for row in _rows(out)}
    for i, video in enumerate(videos):
        assert cli.main(["ask", str(video), f"what moves in {i}?", "--json", "--clips", "2", *FAST[:-1]]) == 0
        asked = json.loads(capsys.readouterr().out)
        assert rows[f"v{i}"]["answer"] == asked["answer"] and rows[f"v{i}"]["clip_spans"] == asked["clip_spans"]
        assert rows[f"v{i}"]["prompt_tokens"] == asked["prompt_tokens"]


def test_batch_size_answers_several_videos_together_as_one_at_a_time(folder, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    for video in sorted(folder.glob("pair000*.mp4"))[:5] + [folder / CORRUPT[0]]:
        (small / video.name).write_bytes(video.read_bytes())
    rows = {}
    for size in (1, 3):  # 5 good videos in batches of 3: one full batch, one short, the corrupt one alone
        out = tmp_path / f"rows{size}.jsonl"
        code, err = _run([str(small), "--prompt", PROMPT, "--out", str(out), "--clips", "2", "--batch-size",
                          str(size), *FAST], capsys)
        assert code == 0, err
        rows[size] = {row["id"]: row for row in _rows(out)}
    assert sorted(rows[3]) == sorted(p.name for p in small.iterdir())
    assert rows[3][CORRUPT[0]]["error"]["reason"] == "decode_error"
    for key in ("answer", "clip_spans", "prompt_tokens", "new_tokens", "error"):
        assert {i: r.get(key) for i, r in rows[3].items()} == {i: r.get(key) for i, r in rows[1].items()}, key


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_batch_size_is_one_usage_line(value, folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run([str(folder), "--prompt", PROMPT, "--out", str(tmp_path / "r.jsonl"), "--batch-size", value, *FAST],
             capsys)
    err = capsys.readouterr().err
    assert "--batch-size" in err and "Traceback" not in err


def test_shard_members_and_captions_for_the_trainer(folder, tmp_path, capsys):
    from mugstan_train.data import read_annotations

    tar = tmp_path / "shard-00000.tar"
    with tarfile.open(tar, "w") as handle:
        for name in ("pair0000_a.mp4", "pair0000_b.mp4"):
            handle.add(folder / name, arcname=name.replace(".mp4", "") + ".mp4")
        handle.add(folder / CORRUPT[0], arcname="broken.mp4")
    out = tmp_path / "rows.jsonl"
    code, err = _run([str(tar), "--prompt", PROMPT, "--out", str(out), *FAST], capsys)
    assert code == 0, err
    rows = {row["id"]: row for row in _rows(out)}
    assert set(rows) == {f"{tar}:pair0000_a.mp4", f"{tar}:pair0000_b.mp4", f"{tar}:broken.mp4"}
    assert rows[f"{tar}:broken.mp4"]["error"]["reason"] == "decode_error"
    assert all(row["shard"] == str(tar) for row in rows.values())
    captions = tmp_path / "captions.jsonl"
    out = tmp_path / "folder_rows.jsonl"
    code, err = _run([str(folder), "--prompt", PROMPT, "--out", str(out), "--captions-out", str(captions),
                      "--shard", "0/8", *FAST], capsys)
    assert code == 0, err
    answered = [r for r in _rows(out) if r["error"] is None]
    records = read_annotations(captions)
    assert [r.video for r in records] == [r["video"] for r in answered]
    assert [r.captions for r in records] == [[r["answer"]] for r in answered]
    assert all(Path(r.video).is_file() for r in records)


@pytest.mark.parametrize("case", ["missing", "not_a_list", "bad_braces", "out_is_folder", "other_settings",
                                  "foreign_file", "bad_shard", "questions_unknown_id"])
def test_bad_input_is_one_line_before_the_model_loads(case, folder, tmp_path, capsys, monkeypatch):
    def refuse(self, **overrides):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ModelArgs, "load", refuse)
    out = tmp_path / "rows.jsonl"
    argv = [str(folder), "--prompt", PROMPT, "--out", str(out), *FAST]
    if case == "missing":
        argv[0] = str(tmp_path / "nowhere")
    elif case == "not_a_list":
        (tmp_path / "notes.txt").write_text("x")
        argv[0] = str(tmp_path / "notes.txt")
    elif case == "bad_braces":
        argv[0] = str(tmp_path / "shard-{000..001.tar")
    elif case == "out_is_folder":
        argv[4] = str(tmp_path)
    elif case == "other_settings":
        ResultsFile(out, {"prompt": "something else"}).open()
    elif case == "foreign_file":
        out.write_text('{"not": "ours"}\n')
    elif case == "bad_shard":
        argv += ["--shard", "2/2"]
    elif case == "questions_unknown_id":
        questions = tmp_path / "q.jsonl"
        questions.write_text('{"id": "nope.mp4", "question": "q"}\n')
        argv[1:3] = ["--questions", str(questions)]
    with pytest.raises(SystemExit) if case == "bad_shard" else _no_exit():
        code, err = _run(argv, capsys)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err
    if case == "bad_shard":
        assert "--shard" in capsys.readouterr().err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_list_with_duplicate_ids_is_refused(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("video,id\na.mp4,x\nb.mp4,x\n")
    with pytest.raises(ValueError, match="appears twice"):
        read_items(str(listing))
    assert BatchItem("x", "a.mp4").source() == "a.mp4"
