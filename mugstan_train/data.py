"""Video-text data for post-pretraining and evaluation (docs/design.md section 3).

* Annotations: CSV, JSON (a list of objects) or JSONL, with configurable column
  names. A video path is either a column or a template over columns (WebVid:
  ``{page_dir}/{videoid}.mp4``); a caption cell may hold one caption or a list.
  Rows naming the same video are merged: one video, several captions, and
  training samples one caption per visit.
* Sampling is exact on resume: the order of an epoch is a permutation seeded by
  (seed, epoch), each rank takes its slice of every global batch, and every
  sample draws its frames, crop and caption from a generator seeded by
  (seed, epoch, index). Nothing depends on worker count or on global RNG state.
* Hard-negative batching (``groups``): rows sharing a group value (e.g. a clip
  and its time-reversed partner) are placed next to each other in the epoch's
  order, so they share a global batch (see :class:`GlobalBatchSampler`).
* A video that fails to decode is logged and replaced by another index drawn
  from the same seeded generator; each batch carries how many decodes were
  attempted and how many failed, and :class:`DecodeFailureMonitor` aborts the
  run when failures pass a threshold within a window.

Only ``mugstan_chat.video`` opens video files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mugstan_chat.video import CLIP_MEAN, CLIP_STD, VideoBytes, VideoDecodeError, load_video_clips

logger = logging.getLogger(__name__)

#: Column layouts of common annotation files (overridable field by field).
PRESETS = {
    "generic": {"video_column": "video", "caption_column": "caption", "video_template": None},
    # WebVid-2.5M/10M CSV: videoid,contentUrl,duration,page_dir,name
    "webvid": {"video_column": None, "caption_column": "name", "video_template": "{page_dir}/{videoid}.mp4"},
    # MSR-VTT test lists (e.g. the 1k-A CSV: key,vid_key,video_id,sentence)
    "msrvtt": {"video_column": None, "caption_column": "sentence", "video_template": "{video_id}.mp4"},
    # recognition (--task recognition, mugstan_train/recognition_data.py): a Kinetics-400 style list "path,label"
    # (label: class name or 0-based index) ...
    "k400": {"video_column": "path", "caption_column": None, "video_template": None, "label_column": "label"},
    # ... and Something-Something v2's published something-something-v2-{train,validation}.json (a list of
    # {"id", "label", "template", "placeholders"}): video {id}.webm, class = the template without brackets
    "ssv2": {"video_column": None, "caption_column": None, "video_template": "{id}.webm", "label_column": "template"},
}


class DataError(Exception):
    """An annotation file cannot be read, or too many videos fail to decode."""


@dataclass
class Columns:
    """Where a video path and its caption(s) are found in an annotation row."""

    video_column: str | None = "video"  # path relative to the video root
    caption_column: str | None = "caption"  # one caption, or a JSON list of captions (None: recognition lists)
    video_template: str | None = None  # e.g. "{page_dir}/{videoid}.mp4"; overrides video_column
    label_column: str | None = None  # recognition: class name or class index

    @classmethod
    def preset(cls, name: str, **overrides) -> "Columns":
        if name not in PRESETS:
            raise ValueError(f"unknown annotation preset {name!r}; expected one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


@dataclass
class VideoRecord:
    video: str | VideoBytes  # path relative to the video root, or the video itself (evaluation shards)
    captions: list[str] = field(default_factory=list)
    label: str | None = None
    extra: dict = field(default_factory=dict)  # the first row's other columns (e.g. "pair")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv" or suffix == ".tsv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"annotations": [...]} or {video: caption(s)}
                data = data.get("annotations") or [{"video": k, "caption": v} for k, v in data.items()]
            return list(data)
    except (OSError, json.JSONDecodeError, csv.Error) as error:
        raise DataError(f"cannot read annotations {path}: {error}") from error
    raise DataError(f"annotations {path}: unknown format {suffix!r}; use .csv, .tsv, .json or .jsonl")


def _captions(cell) -> list[str]:
    if isinstance(cell, list):
        return [str(c) for c in cell]
    text = str(cell)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(c) for c in parsed]
        except json.JSONDecodeError:
            pass
    return [text]


def read_annotations(path: str | os.PathLike, columns: Columns | None = None) -> list[VideoRecord]:
    """Reads an annotation file into one record per video (captions merged, first-appearance order)."""
    columns = columns or Columns()
    path = Path(path)
    rows = _read_rows(path)
    records: dict[str, VideoRecord] = {}
    for number, row in enumerate(rows, start=1):
        try:
            if columns.video_template is not None:
                video = columns.video_template.format(**row)
            else:
                video = str(row[columns.video_column])
            captions = _captions(row[columns.caption_column]) if columns.caption_column else []
            label = None if columns.label_column is None else str(row[columns.label_column])
        except (KeyError, IndexError) as error:
            raise DataError(f"{path} row {number}: missing column {error}; columns are {sorted(row)}") from error
        record = records.get(video)
        if record is None:
            extra = {k: v for k, v in row.items() if k not in (columns.video_column, columns.caption_column)}
            records[video] = VideoRecord(video=video, captions=list(captions), label=label, extra=extra)
        else:
            record.captions.extend(captions)
    if not records:
        raise DataError(f"{path} holds no annotations")
    return list(records.values())


def sample_seed(seed: int, epoch: int, index: int, attempt: int = 0) -> int:
    """A 63-bit seed for one visit of one sample (independent of rank, worker and batch size)."""
    return int(np.random.SeedSequence([seed, epoch, index, attempt]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class ClipSettings:
    frames: int = 12
    size: int = 224
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD


class TrainDataset(Dataset):
    """Indexed by (index, epoch): one training clip (random frame per segment, random crop) and one caption."""

    def __init__(self, records: list[VideoRecord], root: str | os.PathLike, clip: ClipSettings,
                 seed: int = 0, max_retries: int = 20):
        self.records = [r for r in records if r.captions]
        if not self.records:
            raise DataError("no annotated video has a caption")
        self.root = Path(root)
        self.clip = clip
        self.seed = seed
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        failures = 0
        for attempt in range(self.max_retries + 1):
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, attempt))
            record = self.records[index]
            try:
                clips = load_video_clips(self.root / record.video, frames_per_clip=self.clip.frames, num_clips=1,
                                         size=self.clip.size, mean=self.clip.mean, std=self.clip.std,
                                         mode="train", generator=generator)
            except VideoDecodeError as error:
                failures += 1
                logger.warning("skipping video (replaced by another): %s", error)
                index = int(torch.randint(len(self.records), (1,), generator=generator))
                continue
            caption = record.captions[int(torch.randint(len(record.captions), (1,), generator=generator))]
            return {"video": clips.clips[0], "caption": caption, "index": index, "failures": failures}
        raise DataError(f"{self.max_retries + 1} videos in a row failed to decode (last: {record.video}); "
                        f"check --video-root and the annotation file")


def collate_train(items: list[dict]) -> dict:
    return {
        "video": torch.stack([item["video"] for item in items]),  # (B, T, 3, H, W)
        "captions": [item["caption"] for item in items],
        "index": torch.tensor([item["index"] for item in items]),
        "failures": sum(item["failures"] for item in items),
        "attempts": sum(item["failures"] + 1 for item in items),
    }


def group_ids(records: Sequence[VideoRecord], column: str) -> list[int]:
    """One integer per record naming its value of ``column`` (first-appearance order), for grouped batches."""
    ids: dict[str, int] = {}
    out = []
    for record in records:
        if column not in record.extra:
            raise DataError(f"group column {column!r} is missing for video {record.video}; "
                            f"columns are {sorted(record.extra)}")
        out.append(ids.setdefault(str(record.extra[column]), len(ids)))
    return out


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's part of each global batch of an epoch's seeded permutation.

    Rank r gets items ``[r*B, (r+1)*B)`` of every global batch of ``B * world_size``,
    so the gathered batch is identical to a one-process run with batch ``B * world_size``.
    The last incomplete global batch is dropped (every rank must contribute B items).
    This sampler plays the role of torch's ``DistributedSampler`` (which the trainer
    does not use): every rank computes the same global order from (seed, epoch) alone.

    ``groups`` (one id per sample) turns on hard-negative batching: the epoch order
    is a seeded permutation of the groups, each group's members contiguous and
    shuffled among themselves. The global order is built before the per-rank
    slicing, so a group lands in one *global* batch (possibly on several ranks,
    which is what the loss needs: it all-gathers features, so every rank scores the
    whole global batch). A group is cut only where it straddles a global-batch
    boundary: never when every group size divides the global batch (pairs with an
    even batch), and always when a group is larger than the global batch. The
    order still depends only on (seed, epoch, groups), so resume stays exact.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, groups: Sequence[int] | None = None):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"{len(groups)} group ids for {num_samples} samples")
        self.groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.long)
        if self.batches_per_epoch == 0:
            raise DataError(f"{num_samples} samples are fewer than one global batch "
                            f"({batch_size} x {world_size} ranks)")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's permutation and skips the batches already consumed (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def epoch_order(self) -> list[int]:
        """The epoch's global sample order (the same on every rank)."""
        if not self.shuffle:
            order = torch.arange(self.num_samples)
        else:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 & 0xFFFFFFFF))
            order = torch.randperm(self.num_samples, generator=generator)
        if self.groups is not None:
            # members keep the (shuffled) order above; groups follow a seeded permutation of their own
            num_groups = int(self.groups.max()) + 1 if self.num_samples else 0
            if self.shuffle:
                rank_of_group = torch.randperm(num_groups, generator=generator)
            else:  # first-appearance order of the groups
                first = torch.full((num_groups,), self.num_samples, dtype=torch.long)
                first.scatter_reduce_(0, self.groups, torch.arange(self.num_samples), reduce="amin")
                rank_of_group = torch.argsort(torch.argsort(first))
            keys = rank_of_group[self.groups[order]]
            order = order[torch.sort(keys, stable=True).indices]
        return order.tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.epoch_order()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_batch, self.batches_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            yield [(i, self.epoch) for i in order[start:start + self.batch_size]]


def build_train_loader(dataset: TrainDataset, sampler: GlobalBatchSampler, workers: int,
                       pin_memory: bool = False) -> DataLoader:
    # A private generator keeps DataLoader from drawing worker seeds from the global RNG,
    # which would make the global RNG (drop-path) depend on when iterators are created.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_train,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                      persistent_workers=False, prefetch_factor=2 if workers > 0 else None)


class DecodeFailureMonitor:
    """Counts decode failures of one rank and aborts when a window holds too many.

    The run aborts when the failed decodes among the last ``window`` attempts
    exceed ``max_rate * window``: a few bad files early in a run never abort it,
    a data problem (wrong root, broken shard) does, with a message saying so.
    """

    def __init__(self, max_rate: float = 0.05, window: int = 1000):
        self.max_rate, self.window = max_rate, window
        self.recent: deque[tuple[int, int]] = deque()  # (attempts, failures) per batch
        self.in_window = [0, 0]
        self.total_attempts, self.total_failures = 0, 0

    def update(self, attempts: int, failures: int) -> None:
        self.total_attempts += attempts
        self.total_failures += failures
        self.recent.append((attempts, failures))
        self.in_window[0] += attempts
        self.in_window[1] += failures
        while self.recent and self.in_window[0] - self.recent[0][0] >= self.window:
            old = self.recent.popleft()
            self.in_window[0] -= old[0]
            self.in_window[1] -= old[1]
        if self.in_window[1] > self.max_rate * self.window:
            raise DataError(
                f"{self.in_window[1]} of the last {self.in_window[0]} video decodes failed (limit "
                f"{self.max_rate:.1%} of a {self.window}-decode window); see the warnings above for the files. "
                f"Check --video-root and the annotation file, or raise --max-decode-failure-rate.")

    def state_dict(self) -> dict:
        return {"recent": [list(x) for x in self.recent], "total": [self.total_attempts, self.total_failures]}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(tuple(x) for x in state["recent"])
        self.in_window = [sum(a for a, _ in self.recent), sum(f for _, f in self.recent)]
        self.total_attempts, self.total_failures = state["total"]


class EvalDataset(Dataset):
    """One evaluation clip per video (middle frame of each segment, centre crop); failures reported, not replaced."""

    def __init__(self, records: list[VideoRecord], root: str | os.PathLike, clip: ClipSettings):
        self.records, self.root, self.clip = records, Path(root), clip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        try:
            video = self.records[index].video
            source = video if isinstance(video, VideoBytes) else self.root / video
            clips = load_video_clips(source, frames_per_clip=self.clip.frames,
                                     num_clips=1, size=self.clip.size, mean=self.clip.mean, std=self.clip.std,
                                     mode="eval")
            return {"video": clips.clips[0], "index": index, "ok": True}
        except VideoDecodeError as error:
            logger.warning("evaluation skips a video: %s", error)
            shape = (self.clip.frames, 3, self.clip.size, self.clip.size)
            return {"video": torch.zeros(shape), "index": index, "ok": False}


def collate_eval(items: list[dict]) -> dict:
    return {"video": torch.stack([i["video"] for i in items]), "index": torch.tensor([i["index"] for i in items]),
            "ok": torch.tensor([i["ok"] for i in items])}


def build_eval_loader(dataset: EvalDataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_eval, generator=torch.Generator().manual_seed(0))
