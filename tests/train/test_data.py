"""Annotation reading, exact-resume sampling, and skipping of videos that fail to decode."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mugstan_train.data import (ClipSettings, Columns, DataError, DecodeFailureMonitor, GlobalBatchSampler,
                                TrainDataset, group_ids, read_annotations)
from mugstan_train.post_pretrain import train


@pytest.fixture(scope="module")
def videos(synthetic_videos) -> Path:
    return synthetic_videos(8, seed=1, size=32, frames=12).folder


def test_csv_jsonl_and_webvid_layouts(tmp_path):
    (tmp_path / "a.csv").write_text("video,caption\nv1.mp4,first\nv2.mp4,second\nv1.mp4,again\n")
    records = read_annotations(tmp_path / "a.csv")
    assert [(r.video, r.captions) for r in records] == [("v1.mp4", ["first", "again"]), ("v2.mp4", ["second"])]
    (tmp_path / "b.jsonl").write_text(json.dumps({"clip": "x.mp4", "text": ["one", "two"]}) + "\n")
    records = read_annotations(tmp_path / "b.jsonl", Columns(video_column="clip", caption_column="text"))
    assert records[0].captions == ["one", "two"]
    with open(tmp_path / "webvid.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        writer.writerow(["1234", "http://x", "PT00H00M10S", "001_050", "a dog runs, fast"])
    records = read_annotations(tmp_path / "webvid.csv", Columns.preset("webvid"))
    assert (records[0].video, records[0].captions) == ("001_050/1234.mp4", ["a dog runs, fast"])
    (tmp_path / "msr.csv").write_text("key,vid_key,video_id,sentence\nret0,msr7020,video7020,a man talks\n")
    assert read_annotations(tmp_path / "msr.csv", Columns.preset("msrvtt"))[0].video == "video7020.mp4"
    with pytest.raises(DataError, match="missing column"):
        read_annotations(tmp_path / "a.csv", Columns(video_column="path"))


def test_sampler_ranks_partition_the_global_batch():
    one = GlobalBatchSampler(12, 4, seed=3)
    ranks = [GlobalBatchSampler(12, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for epoch in (0, 1):
        one.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        joined = [a + b for a, b in zip(*[list(s) for s in ranks])]
        assert joined == list(one)
    one.set_epoch(1, start_batch=2)
    full = GlobalBatchSampler(12, 4, seed=3)
    full.set_epoch(1)
    assert list(one) == list(full)[2:] and len(one) == 1


def test_grouped_sampler_keeps_groups_in_one_global_batch():
    groups = [i // 2 for i in range(16)]  # 8 pairs, shuffled apart by the plain sampler
    plain = GlobalBatchSampler(16, 4, seed=5)
    assert any(len({i // 2 for i, _ in batch}) == 4 for batch in plain)  # some plain batch splits its pairs
    for epoch in (0, 1):
        one = GlobalBatchSampler(16, 4, seed=5, groups=groups)
        ranks = [GlobalBatchSampler(16, 2, rank=r, world_size=2, seed=5, groups=groups) for r in range(2)]
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == 4 and sorted(i for b in batches for i, _ in b) == list(range(16))
        assert all(len({i // 2 for i, _ in b}) == 2 for b in batches)  # every global batch = 2 whole pairs
        # distributed: each rank takes its slice of the same global order (a pair may span ranks)
        assert [a + b for a, b in zip(*[list(s) for s in ranks])] == batches
        resumed = GlobalBatchSampler(16, 4, seed=5, groups=groups)
        resumed.set_epoch(epoch, start_batch=3)
        assert list(resumed) == batches[3:]
    one.set_epoch(0)
    assert list(one) != batches  # epochs differ
    with pytest.raises(ValueError, match="group ids"):
        GlobalBatchSampler(16, 4, groups=groups[:-1])


def test_group_ids_read_the_annotation_column(tmp_path):
    (tmp_path / "a.csv").write_text("video,caption,pair\nv1.mp4,a,7\nv2.mp4,b,3\nv3.mp4,c,7\n")
    assert group_ids(read_annotations(tmp_path / "a.csv"), "pair") == [0, 1, 0]
    with pytest.raises(DataError, match="group column 'scene'"):
        group_ids(read_annotations(tmp_path / "a.csv"), "scene")


def test_same_key_gives_same_clip_and_caption(videos):
    records = read_annotations(videos / "annotations.csv")
    dataset = TrainDataset(records, videos, ClipSettings(frames=4, size=32), seed=5)
    a, b, c = dataset[(2, 0)], dataset[(2, 0)], dataset[(2, 1)]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    assert a["video"].shape == (4, 3, 32, 32) and not torch.equal(a["video"], c["video"])


def _with_bad_videos(videos: Path, tmp_path: Path) -> Path:
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    rows = (videos / "annotations.csv").read_text().splitlines()
    rows += ["../" + tmp_path.name + "/corrupt.mp4,a corrupt video,99", "missing.mp4,a missing video,98"]
    path = tmp_path / "annotations.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_videos_are_replaced_and_counted(videos, tmp_path):
    path = _with_bad_videos(videos, tmp_path)
    records = read_annotations(path)
    dataset = TrainDataset(records, videos, ClipSettings(frames=4, size=32), seed=0)
    for index in (len(records) - 2, len(records) - 1):
        item = dataset[(index, 0)]
        assert item["failures"] >= 1 and item["index"] < len(records) - 2
    out = tmp_path / "run"
    result = train(["--backbone", "tiny", "--train-data", str(path), "--video-root", str(videos), "--frames", "4",
                    "--batch-size", "5", "--workers", "2", "--output-dir", str(out), "--max-steps", "2",
                    "--stan-layers", "2", "--save-interval", "0", "--log-interval", "1",
                    "--max-decode-failure-rate", "0.5", "--failure-window", "10"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if r["type"] == "train"]
    assert len(result.losses) == 2 and steps[-1]["decode_failures"] >= 1


def test_too_many_failures_abort_with_a_message(videos, tmp_path):
    path = _with_bad_videos(videos, tmp_path)
    with pytest.raises(DataError, match="video decodes failed"):
        train(["--backbone", "tiny", "--train-data", str(path), "--video-root", str(videos), "--frames", "4",
               "--batch-size", "10", "--workers", "0", "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
               "--stan-layers", "2", "--save-interval", "0", "--failure-window", "20"])


def test_failure_monitor_window():
    monitor = DecodeFailureMonitor(max_rate=0.1, window=10)
    monitor.update(5, 1)
    monitor.update(5, 0)
    monitor.update(5, 0)  # the first batch's failure leaves the window
    assert monitor.in_window == [10, 0] and monitor.total_failures == 1
    with pytest.raises(DataError):
        monitor.update(4, 2)
