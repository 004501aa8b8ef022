"""Training-data throughput: clips/s from tar shards vs from local files, by data-loading workers.

WebVid-like clips are written locally (10 s, 640x360, 25 fps, H.264), once as files
with a CSV and once as video2dataset-layout shards (:mod:`mugstan_train.make_shards`); each
path is read through the trainer's own loaders (mugstan_train/data.py, mugstan_train/shards.py)
at 8 frames and 224 px, random frames and crops as in training. The table gives
clips/s, clips/s per worker, and the workers per GPU needed for the paper's
11 clips/s per GPU (0.8k GPU hours for 3 epochs of WebVid10M on 32 A100s).

    python -m mugstan_train.benchmarks.data --clips 32 --workers 1 2 --out runs/bench/data.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from itertools import islice
from pathlib import Path

from mugstan_chat.benchmarks import common
from mugstan_chat.benchmarks.video import make_benchmark_video

from mugstan_train import make_shards
from mugstan_train.data import ClipSettings, GlobalBatchSampler, TrainDataset, build_train_loader, read_annotations
from mugstan_train.shards import ShardTrainData, expand_shards

PAPER_CLIPS_PER_GPU = 11.0
COLUMNS = ["source", "workers", "clips", "seconds", "clips_per_s", "clips_per_s_per_worker", "workers_per_gpu"]


def make_clips(folder: Path, count: int, seconds: int, width: int, height: int, fps: int) -> Path:
    """``count`` WebVid-like clips and their annotations.csv (one encoded clip, copied: encoding is not measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "clip0000.mp4"
    if not first.exists():
        make_benchmark_video(first, width, height, seconds, fps)
    lines = ["video,caption"]
    for i in range(count):
        path = folder / f"clip{i:04d}.mp4"
        if not path.exists():
            path.write_bytes(first.read_bytes())
        lines.append(f"{path.name},a clip number {i}")
    (folder / "annotations.csv").write_text("\n".join(lines) + "\n")
    return folder / "annotations.csv"


def measure(batches, clips: int) -> float:
    """Seconds to draw ``clips`` clips (batch size 1) after the first one (worker start-up excluded)."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    drawn = sum(1 for _ in islice(iterator, clips - 1))
    return (time.perf_counter() - start) / max(1, drawn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mugstan_train.benchmarks.data", description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=32, help="clips per measurement (and written)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--work-dir", default=None, help="where the clips and shards are written (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args(argv)
    if args.clips < 2 or min(args.workers) < 1:
        p.error("--clips must be at least 2 and --workers positive")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        csv = make_clips(work / "videos", args.clips, args.seconds, args.width, args.height, args.fps)
        records = read_annotations(csv)
        shard_count = max(args.workers)
        make_shards.write_shards(records, work / "videos", work / "shards", math.ceil(args.clips / shard_count))
        clip = ClipSettings(frames=args.frames, size=args.size)
        source = expand_shards(f"{work}/shards/{{00000..{shard_count - 1:05d}}}.tar")
        rows = []
        for workers in args.workers:
            dataset = TrainDataset(records, work / "videos", clip)
            sampler = GlobalBatchSampler(len(dataset), 1, seed=0)
            per_clip = {"files": measure(build_train_loader(dataset, sampler, workers), args.clips)}
            stream = ShardTrainData(source, clip, batch_size=1, world_size=1, workers=workers,
                                    num_samples=args.clips, resampled=True, seed=0)
            per_clip["shards"] = measure(stream.loader(0), args.clips)
            for name, seconds in per_clip.items():
                rate = 1.0 / seconds
                rows.append({"source": name, "workers": workers, "clips": args.clips, "seconds": seconds * args.clips,
                             "clips_per_s": rate, "clips_per_s_per_worker": rate / workers,
                             "workers_per_gpu": math.ceil(PAPER_CLIPS_PER_GPU / (rate / workers))})
    print(f"machine: {common.machine_description('cpu')}; clips {args.seconds} s {args.width}x{args.height} "
          f"{args.fps} fps H.264, {args.frames} frames at {args.size} px")
    print(common.markdown_table(rows, COLUMNS))
    common.write_json(args.out, {"machine": common.machine_description("cpu"), "settings": vars(args),
                                   "paper_clips_per_gpu": PAPER_CLIPS_PER_GPU, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
