"""A CSV of local videos -> tar shards in video2dataset's webdataset layout (for local data and the tests).

Each shard ``OUT/00000.tar`` holds ``KEY.mp4``, ``KEY.txt`` (caption) and ``KEY.json``
(``videoid``, ``page_dir``, ``duration``, ``caption``, ``url``, ``key``, ``status``,
``error_message``); a video that is missing or unreadable stays in the tar with its
txt and json but no mp4, as video2dataset keeps its failed downloads. Beside each tar,
``00000_stats.json`` (``count``, ``successes``, ``failed_to_download``, ...), from which
the trainer takes its epoch length. (video2dataset's ``.parquet`` metadata files are
not written: the trainer does not read them.)

The shards are written into a hidden temporary folder beside ``--out`` that takes its
place once complete, so an interrupted run leaves no partial set; an existing ``--out``
that is not empty is refused (exit 2) unless ``--overwrite``, and a file there always is.

    mugstan-make-shards --data videos.csv --video-root videos --out shards --samples-per-shard 1000
    mugstan-make-shards --data webvid.csv --preset webvid --video-root webvid/videos --out shards
    python -m mugstan_train.make_shards ...   # the same, without the install's command
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from mugstan_chat.entrypoints.reporting import run_reporting_errors
from mugstan_chat.output_dir import atomic_output_dir, output_dir_problem
from mugstan_chat.video import VideoDecodeError, probe_video

from mugstan_train.data import PRESETS, Columns, DataError, read_annotations


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mugstan-make-shards", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="annotations (.csv, .tsv, .json, .jsonl) naming local videos")
    p.add_argument("--video-root", default=".", help="folder the video paths are relative to")
    p.add_argument("--preset", default="generic", choices=sorted(PRESETS), help="annotation column layout")
    p.add_argument("--video-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--video-template", default=None)
    p.add_argument("--out", required=True, help="output folder for 00000.tar, 00000_stats.json, ... (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a folder that is not empty")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    return p


def write_shards(records, video_root: str | os.PathLike, out: str | os.PathLike, samples_per_shard: int) -> list[dict]:
    """Writes the shards; returns each shard's stats (video2dataset's ``_stats.json`` fields)."""
    out, root = Path(out), Path(video_root)
    out.mkdir(parents=True, exist_ok=True)
    shard_digits = max(5, len(str(max(0, (len(records) - 1) // samples_per_shard))))
    sample_digits = len(str(samples_per_shard - 1))
    all_stats = []
    for shard, start in enumerate(tqdm(range(0, len(records), samples_per_shard), desc="shards", unit="shard")):
        name = f"{shard:0{shard_digits}d}"
        started = time.time()
        stats = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_subsample": 0,
                 "bytes_downloaded": 0, "status_dict": {}}
        with wds.TarWriter(str(out / f"{name}.tar")) as writer:
            for offset, record in enumerate(records[start:start + samples_per_shard]):
                key = f"{shard:0{shard_digits}d}{offset:0{sample_digits}d}"
                path = root / record.video
                caption = record.captions[0] if record.captions else ""
                meta = {"videoid": Path(record.video).stem, "page_dir": str(Path(record.video).parent),
                        "duration": None, "caption": caption, "url": str(path), "key": key,
                        "status": "success", "error_message": None}
                sample = {"__key__": key, "txt": caption}
                try:
                    meta["duration"] = probe_video(path).duration
                    sample["mp4"] = path.read_bytes()
                except (VideoDecodeError, OSError) as error:
                    meta.update(status="failed_to_download", error_message=str(error))
                stats["count"] += 1
                stats["successes" if "mp4" in sample else "failed_to_download"] += 1
                stats["bytes_downloaded"] += len(sample.get("mp4", b""))
                stats["status_dict"][meta["status"]] = stats["status_dict"].get(meta["status"], 0) + 1
                sample["json"] = json.dumps(meta, indent=4)
                writer.write(sample)
        stats.update(start_time=started, end_time=time.time(), duration=time.time() - started)
        (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        all_stats.append(stats)
    return all_stats


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be positive")
    problem = output_dir_problem(args.out, args.overwrite, "--out")
    if problem:
        parser.error(problem)
    columns = Columns.preset(args.preset, video_column=args.video_column, caption_column=args.caption_column,
                             video_template=args.video_template)
    try:
        records = read_annotations(args.data, columns)
    except DataError as error:
        parser.error(str(error))
    return run_reporting_errors(parser.prog, args.debug, _write_and_report, args, records)


def _write_and_report(args: argparse.Namespace, records) -> int:
    with atomic_output_dir(args.out) as tmp:
        stats = write_shards(records, args.video_root, tmp, args.samples_per_shard)
    print(f"{len(stats)} shards in {args.out}: {sum(s['successes'] for s in stats)} videos, "
          f"{sum(s['failed_to_download'] for s in stats)} failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
