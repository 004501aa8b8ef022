"""Tar shards in video2dataset's layout as training data: exact skip counts, epochs over ranks and workers."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mugstan_chat.synthetic import make_synthetic_videos
from mugstan_chat.video import write_video

from mugstan_train import make_shards
from mugstan_train.benchmarks import data as benchmark_data
from mugstan_train.data import ClipSettings, DataError
from mugstan_train.params import parse_args
from mugstan_train.shards import (DecodeSamples, ShardErrorHandler, ShardTrainData, SkipCounter, StreamAccount,
                                  count_samples, expand_shards, is_shard_spec)

CLIP = ClipSettings(frames=4, size=32)


def _meta(key: str, caption: str, status: str = "success") -> str:
    return json.dumps({"videoid": key, "page_dir": "000", "duration": 0.5, "caption": caption, "url": f"x/{key}",
                       "key": key, "status": status,
                       "error_message": None if status == "success" else "HTTP Error 404"}, indent=4)


def write_v2d_shards(out: Path, videos: list[tuple[Path, str]], usable: list[int], extras: dict[int, list[str]],
                     short_video: Path, seed: int = 0) -> set[str]:
    """Shard i gets ``usable[i]`` good samples and the bad ones named in ``extras[i]`` (failed, truncated,
    empty, short, in that order of appearance), written with webdataset's TarWriter; returns the usable keys."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, cursor = set(), 0
    for shard, count in enumerate(usable):
        stats = Counter()
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as writer:
            kinds = ["good"] * count + extras.get(shard, [])
            rng.shuffle(kinds)
            for index, kind in enumerate(kinds):
                key = f"{shard:05d}{index:04d}"
                path, caption = videos[cursor % len(videos)]
                cursor += 1
                sample = {"__key__": key, "txt": caption, "json": _meta(key, caption)}
                if kind == "good":
                    sample["mp4"] = path.read_bytes()
                    keys.add(key)
                elif kind == "failed":  # video2dataset keeps a failed download's txt and json, no mp4
                    sample["json"] = _meta(key, caption, "failed_to_download")
                elif kind == "truncated":
                    sample["mp4"] = path.read_bytes()[:300]
                elif kind == "empty":
                    sample["txt"] = "  "
                    sample["mp4"] = path.read_bytes()
                elif kind == "short":
                    sample["mp4"] = short_video.read_bytes()
                writer.write(sample)
                stats["count"] += 1
                stats["successes" if kind != "failed" else "failed_to_download"] += 1
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(dict(stats)))
    return keys


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    videos = make_synthetic_videos(root / "videos", num=8, seed=2, size=32, frames=8)
    short = root / "short.mp4"
    write_video(short, [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(2)], fps=8)
    bad = {0: ["failed", "truncated"], 3: ["failed", "empty"], 5: ["short"], 6: ["failed"]}
    even = write_v2d_shards(root / "even", videos, [4] * 8, bad, short)
    uneven = write_v2d_shards(root / "uneven", videos, [1, 6, 2, 5, 3, 3, 7, 1], bad, short, seed=1)
    return {"root": root, "videos": videos, "even": even, "uneven": uneven, "short": short}


def _keys_of_epoch(source, monkeypatch, *, epoch, resampled=False, workers=2, world=2, batch=2, samples=32):
    """Every rank's keys of one epoch (ranks taken in turn, webdataset reads them from the environment)."""
    per_rank = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        data = ShardTrainData(source, CLIP, batch_size=batch, world_size=world, workers=workers,
                              num_samples=samples, resampled=resampled, seed=7)
        batches = list(islice(StreamAccount(Counter()).batches(data.loader(epoch)), data.batches_per_epoch))
        per_rank.append([key for b in batches for key in b["keys"]])
    return per_rank


def test_spec_detection_and_counts_from_stats(corpus):
    assert is_shard_spec("data/{00000..00007}.tar") and is_shard_spec("pipe:curl -s http://h/{0..3}.tar")
    assert is_shard_spec("a.tar::b.tar") and not is_shard_spec("webvid.csv") and not is_shard_spec("x.jsonl")
    source = expand_shards(f"{corpus['root']}/even/{{00000..00003}}.tar::{corpus['root']}/even/{{00004..00007}}.tar",
                           "1::2")
    assert [len(p) for p in source.parts] == [4, 4] and source.factors == [1.0, 2.0] and len(source.urls) == 8
    assert count_samples(source) == 32 + 3  # video2dataset counts truncated, empty and short downloads as successes
    with pytest.raises(DataError, match="1 of 9 shards are missing.*00008.tar"):
        expand_shards(f"{corpus['root']}/even/{{00000..00008}}.tar")


def test_used_and_skipped_counts_are_exact(corpus, tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file" * 100)
    urls = sorted(str(p) for p in (corpus["root"] / "even").glob("*.tar")) + [str(broken)]
    counter = SkipCounter()
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=ShardErrorHandler(counter)),
                                DecodeSamples(CLIP, None, 0, 0, counter))
    used = [sample["key"] for sample in pipeline]
    assert sorted(used) == sorted(corpus["even"])
    assert dict(counter.total) == {"no_video": 3, "decode_error": 1, "no_caption": 1, "too_short": 1,
                                   "shard_error": 1}


def test_every_key_once_per_epoch_over_ranks_and_workers(corpus, monkeypatch):
    source = expand_shards(f"{corpus['root']}/even/{{00000..00007}}.tar")
    epochs = [_keys_of_epoch(source, monkeypatch, epoch=e) for e in (0, 1)]
    for per_rank in epochs:
        seen = [key for keys in per_rank for key in keys]
        assert sorted(seen) == sorted(corpus["even"])  # 32 usable keys, each exactly once
        assert all(len(keys) == 16 for keys in per_rank)
    assert epochs[0] != epochs[1]  # a new shard order every epoch
    uneven = expand_shards(f"{corpus['root']}/uneven/{{00000..00007}}.tar")
    seen = [key for keys in _keys_of_epoch(uneven, monkeypatch, epoch=0, samples=28) for key in keys]
    assert seen and max(Counter(seen).values()) == 1 and set(seen) <= corpus["uneven"]


def test_resampled_streams_repeat_with_the_seed(corpus, monkeypatch):
    source = expand_shards(f"{corpus['root']}/even/{{00000..00007}}.tar")
    first = _keys_of_epoch(source, monkeypatch, epoch=0, resampled=True, workers=1)
    assert first == _keys_of_epoch(source, monkeypatch, epoch=0, resampled=True, workers=1)
    assert first != _keys_of_epoch(source, monkeypatch, epoch=1, resampled=True, workers=1)
    assert first[0] != first[1]  # ranks draw their own shards


def test_shard_arguments_are_checked_before_the_model(corpus, tmp_path, capsys):
    base = ["--backbone", "tiny", "--output-dir", str(tmp_path)]
    args = parse_args(base + ["--train-data", f"{corpus['root']}/even/{{00000..00007}}.tar"])
    assert args.train_num_samples == 35  # from the *_stats.json files
    for bad, message in [
        (["--train-data", f"{tmp_path}/{{0..3}}.tar"], "4 of 4 shards are missing"),
        (["--train-data", str(corpus["short"].with_suffix(".tar"))], "1 of 1 shards"),
        (["--train-data", f"{corpus['root']}/even/00000.tar::{corpus['root']}/even/00001.tar",
          "--train-data-upsampling-factors", "1::2"], "needs --dataset-resampled"),
        (["--train-data", f"{corpus['root']}/videos/annotations.csv", "--dataset-resampled"], "are for shards"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(base + bad)
        assert message in capsys.readouterr().err
    source = expand_shards(f"{corpus['root']}/even/{{00000..00002}}.tar")
    with pytest.raises(DataError, match=r"3 shards for 2 ranks x 2 workers = 4 readers"):
        ShardTrainData(source, CLIP, batch_size=2, world_size=2, workers=2, num_samples=8, resampled=False, seed=0)


def test_make_shards_writes_the_video2dataset_layout(corpus, tmp_path):
    csv = tmp_path / "videos.csv"
    rows = (corpus["root"] / "videos" / "annotations.csv").read_text().splitlines()
    csv.write_text("\n".join(rows[:6] + ["missing.mp4,a video that is not there,9"]) + "\n")
    assert make_shards.main(["--data", str(csv), "--video-root", str(corpus["root"] / "videos"),
                             "--out", str(tmp_path / "out"), "--samples-per-shard", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    stats = [json.loads((tmp_path / "out" / f"0000{i}_stats.json").read_text()) for i in (0, 1)]
    assert [(s["count"], s["successes"], s["failed_to_download"]) for s in stats] == [(4, 4, 0), (2, 1, 1)]
    samples = list(wds.DataPipeline(wds.SimpleShardList(str(tmp_path / "out" / "00001.tar")),
                                    wds.tarfile_to_samples()))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [["json", "mp4", "txt"],
                                                                                 ["json", "txt"]]
    meta = json.loads(samples[1]["json"])
    assert meta["status"] == "failed_to_download" and meta["key"] == samples[1]["__key__"] == "000011"
    assert {"videoid", "page_dir", "duration", "caption", "url", "error_message"} <= set(meta)


def test_data_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "data.json"
    assert benchmark_data.main(["--clips", "3", "--workers", "1", "--seconds", "1", "--width", "64", "--height",
                                "48", "--fps", "8", "--frames", "2", "--size", "32", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["source"], r["workers"]) for r in rows] == [("files", 1), ("shards", 1)]
    for row in rows:
        assert row["clips_per_s"] > 0 and row["workers_per_gpu"] == -(-11 // row["clips_per_s_per_worker"])
    assert "| source | workers |" in capsys.readouterr().out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_shards_args(corpus, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus["root"] / "videos" / "annotations.csv"), "--video-root",
            str(corpus["root"] / "videos"), "--out", str(out), "--samples-per-shard", "4", *extra]


def test_make_shards_refuses_an_existing_file_or_full_folder(corpus, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("not shards")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    for out, needle in [(existing, "exists and is not a folder"), (full, "is not empty; pass --overwrite")]:
        with pytest.raises(SystemExit) as stopped:
            make_shards.main(_make_shards_args(corpus, out))
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"--out {out} {needle}" in err.strip().splitlines()[-1]
    assert existing.read_text() == "not shards" and _tree(full) == {"notes.txt": b"keep me"}
    with pytest.raises(SystemExit):  # --overwrite replaces folders only, never a file
        make_shards.main(_make_shards_args(corpus, existing, "--overwrite"))
    assert existing.read_text() == "not shards"
    assert make_shards.main(_make_shards_args(corpus, full, "--overwrite")) == 0
    assert sorted(_tree(full)) == [f"0000{i}{suffix}" for i in (0, 1) for suffix in (".tar", "_stats.json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "taken"]  # no temporary folder left


def test_make_shards_interrupted_leaves_the_old_output(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    assert make_shards.main(_make_shards_args(corpus, out)) == 0
    before = _tree(out)
    real, calls = make_shards.probe_video, []

    def failing(path):
        calls.append(path)
        if len(calls) == 6:  # the second shard, half written
            raise RuntimeError("the disk went away")
        return real(path)

    monkeypatch.setattr(make_shards, "probe_video", failing)
    assert make_shards.main(_make_shards_args(corpus, out, "--overwrite", "--samples-per-shard", "2")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("the disk went away")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
