"""Tar shards as training data (docs/design.md section 3): the webdataset pipeline over video2dataset's layout.

A shard spec is a brace-expanded list of ``.tar`` paths or URLs (``pipe:`` commands
too), several joined by ``::``. Each sample is video2dataset's ``KEY.mp4`` (decoded
from memory through :class:`mugstan_chat.video.VideoBytes`, so sampling and rotation
follow the file path's rules), ``KEY.txt`` (the caption) and ``KEY.json`` (metadata,
or the caption with ``caption_key``).

* Epochs: without resampling, every epoch is a seeded shuffle of the shard list
  (the same on every rank), split by node then by worker (webdataset's
  ``split_by_node`` / ``split_by_worker``), so no sample is read twice within an
  epoch. With resampling, every worker draws shards with replacement, seeded by
  (seed, epoch, rank, worker) so a run repeats.
* Nothing stops the run but a real bug: a sample without an mp4 (a failed
  download), without a caption, whose mp4 does not decode, or that is shorter
  than the frames asked for, and a shard that cannot be read, are logged
  (rate-limited, naming shard and key), skipped and counted per reason; the
  counts travel with the batches to the trainer's logs, and a reader's last counts
  (after its last batch) in a final tally item, so a stream that gives no batch
  still says what it skipped (:class:`StreamAccount`).
* A loop that can fail forever has a bound: a reader that skips
  ``max_consecutive_skips`` samples (or unreadable shards) in a row without one
  usable clip gives up, and the trainer stops with the last shard and reason named
  (with ``--dataset-resampled`` a stream of broken shards never ends otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds

from mugstan_chat.video import VideoBytes, VideoDecodeError, load_video_clips

from mugstan_train.data import ClipSettings, DataError, VideoRecord, sample_seed

logger = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")
#: Why a sample (or a whole shard) was skipped; each is a counter in metrics.jsonl ("skipped_<reason>").
SKIP_REASONS = ("no_video", "no_caption", "decode_error", "too_short", "shard_error")
LOG_EVERY_S = 30.0  # after the first few, one warning per reason per this many seconds


def is_shard_spec(spec: str) -> bool:
    """True for a shard list (``.tar`` files, braces, ``::``, ``pipe:`` or URLs), False for an annotation file."""
    if "::" in spec or spec.startswith("pipe:") or "://" in spec:
        return True
    return Path(spec).suffix.lower() not in ANNOTATION_SUFFIXES


@dataclass
class ShardSource:
    """The expanded shard lists of a spec: one list per ``::``-separated part, with its upsampling factor."""

    spec: str
    parts: list[list[str]]
    factors: list[float]

    @property
    def urls(self) -> list[str]:
        """Every shard once, in spec order."""
        return list(dict.fromkeys(url for part in self.parts for url in part))


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def _local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def expand_shards(spec: str, factors: str | None = None, flag: str = "--train-data") -> ShardSource:
    """Expands braces and ``::``; checks that every local shard exists and is readable (before any model loads).

    Raises:
        DataError: naming ``flag``, the number of shards missing and the first of them.
    """
    try:
        parts = [wds.shardlists.expand_urls(part) for part in spec.split("::")]
    except ValueError as error:  # braceexpand's UnbalancedBracesError
        raise DataError(f"{flag} {spec}: {error} (braces list shards as {{00000..00099}} or {{a,b}})") from None
    if any(not part for part in parts):
        raise DataError(f"{flag} {spec}: an empty shard list")
    if factors is None:
        weights = [1.0] * len(parts)
    else:
        try:
            weights = [float(f) for f in factors.split("::")]
        except ValueError as error:
            raise DataError(f"{flag}-upsampling-factors {factors}: not numbers joined by '::' ({error})") from None
        if len(weights) != len(parts) or any(w <= 0 for w in weights):
            raise DataError(f"{flag}-upsampling-factors {factors}: needs {len(parts)} positive factors, one per "
                            f"'::'-separated part of {flag}")
    source = ShardSource(spec, parts, weights)
    missing = [url for url in source.urls if _is_local(url) and not os.access(_local_path(url), os.R_OK)]
    if missing:
        raise DataError(f"{flag}: {len(missing)} of {len(source.urls)} shards are missing or unreadable, "
                        f"first: {missing[0]}")
    return source


def count_samples(source: ShardSource) -> int | None:
    """Usable samples in the shards, from ``sizes.json`` or video2dataset's ``*_stats.json`` (``successes``) beside
    them; None unless every shard is counted (remote shards, or no such files)."""
    total, sizes_cache = 0, {}
    for url in source.urls:
        if not _is_local(url):
            return None
        path = _local_path(url)
        folder = path.parent
        if folder not in sizes_cache:
            sizes_file = folder / "sizes.json"
            sizes_cache[folder] = _read_count_file(sizes_file, None) if sizes_file.is_file() else {}
        if path.name in sizes_cache[folder]:
            total += _count(sizes_cache[folder][path.name], folder / "sizes.json", path.name)
            continue
        stats = path.with_name(path.name[:-len(".tar")] + "_stats.json") if path.name.endswith(".tar") else None
        if stats is None or not stats.is_file():
            return None
        total += _count(_read_count_file(stats, "successes")["successes"], stats, "successes")
    return total


def _read_count_file(path: Path, key: str | None) -> dict:
    """A ``sizes.json`` or ``*_stats.json`` as a dict; a truncated or wrong one is a :class:`DataError`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path} ({type(error).__name__}: {error}); fix or remove it, or give "
                        f"--train-num-samples") from None
    if not isinstance(data, dict) or (key is not None and key not in data):
        raise DataError(f"{path} has no {key!r} count" if key else f"{path} is not a JSON object of counts")
    return data


def _count(value, path: Path, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{path}: {field} is {value!r}, not a count of samples")
    return value


#: Default of ``--max-consecutive-skips``: well above a dead shard or two of video2dataset's 1,000-10,000
#: samples in a row, well below "forever" (at ~250 failed decodes/s, 40 s).
MAX_CONSECUTIVE_SKIPS = 10000


class SkipCounter:
    """Counts skipped samples per reason in one reader process and logs them, rate-limited.

    ``take`` hands the counts gathered since its last call to the next batch (or to the
    reader's final tally), so they reach the trainer whatever process read them. The
    first skip of each reason is kept as an example for error messages. After
    ``max_in_a_row`` skips without a usable clip between them, ``gave_up`` holds why
    and the reader stops.
    """

    def __init__(self, max_in_a_row: int | None = None):
        self.total: Counter = Counter()
        self.pending: Counter = Counter()
        self.decodes = [0, 0]  # attempted, failed since the last take
        self.clips = 0  # usable clips since the last take
        self.last_log: dict[str, float] = {}
        self.examples: dict[str, str] = {}  # reason -> the first "shard:key: detail"
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0
        self.gave_up: str | None = None

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.total[reason] += 1
        self.pending[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}" if detail else where)
        self.in_a_row += 1
        if self.max_in_a_row is not None and self.in_a_row >= self.max_in_a_row and self.gave_up is None:
            self.gave_up = (f"{self.in_a_row} skips in a row (samples or unreadable shards) without one usable "
                            f"clip (limit --max-consecutive-skips {self.max_in_a_row}); the last: {where} ({reason}"
                            f"{': ' + detail if detail else ''})")
        now = time.monotonic()
        if self.total[reason] <= 3 or now - self.last_log.get(reason, 0.0) >= LOG_EVERY_S:
            self.last_log[reason] = now
            logger.warning("skipping %s (%s, %d so far in this reader)%s", where, reason, self.total[reason],
                           f": {detail}" if detail else "")

    def used(self) -> None:
        """A usable clip: the run of skips is broken."""
        self.in_a_row = 0
        self.clips += 1

    def take(self) -> dict:
        """What was counted since the last call: ``skipped`` per reason, decode ``attempts`` and ``failures``."""
        taken = {"skipped": dict(self.pending), "attempts": self.decodes[0], "failures": self.decodes[1],
                 "clips": self.clips}
        self.pending.clear()
        self.decodes = [0, 0]
        self.clips = 0
        return taken


def describe_skips(counts: dict[str, int], examples: dict[str, str]) -> str:
    """``no_video 5 (first: a.tar:0001), shard_error 1 (first: b.tar: IsADirectoryError ...)``, or ``nothing``."""
    parts = [f"{reason} {counts[reason]}" + (f" (first: {examples[reason]})" if reason in examples else "")
             for reason in SKIP_REASONS if counts.get(reason)]
    return ", ".join(parts) or "nothing (the shards hold no samples)"


class ShardErrorHandler:
    """webdataset's exception handler: an unreadable shard (or tar member) is logged, counted and skipped."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, error: Exception) -> bool:
        where = next((a for a in reversed(error.args) if isinstance(a, str) and (".tar" in a or "pipe:" in a)),
                     "a shard")
        cause = error.strerror if isinstance(error, OSError) and error.strerror else \
            (str(error.args[0]) if error.args else "")
        self.counter.skip("shard_error", where, f"{type(error).__name__}: {cause[:200]}" if cause
                          else type(error).__name__)
        return self.counter.gave_up is None  # False ends the stream (webdataset's "stop" answer)


def sample_caption(sample: dict, caption_key: str | None) -> str:
    """The caption: ``KEY.txt``, or the field ``caption_key`` of ``KEY.json``; empty when absent."""
    try:
        if caption_key is None:
            text = sample.get("txt", b"")
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        else:
            value = json.loads(sample.get("json", b"{}")).get(caption_key, "")
            text = "" if value is None else str(value)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""
    return text.strip()


class DecodeSamples:
    """The pipeline stage that turns raw tar samples into training clips, skipping the unusable ones."""

    def __init__(self, clip: ClipSettings, caption_key: str | None, seed: int, epoch: int, counter: SkipCounter,
                 mode: str = "train"):
        self.clip, self.caption_key, self.seed, self.epoch = clip, caption_key, seed, epoch
        self.counter, self.mode = counter, mode

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
            where = f"{url}:{key}"
            caption = sample_caption(sample, self.caption_key)
            if self.counter.gave_up is not None:
                return
            if not sample.get("mp4"):
                self.counter.skip("no_video", where)
                continue
            if not caption:
                self.counter.skip("no_caption", where)
                continue
            # the sample's frames and crop depend on (seed, epoch, shard and key), not on who reads it
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, zlib.crc32(where.encode())))
            self.counter.decodes[0] += 1
            try:
                clips = load_video_clips(VideoBytes(sample["mp4"], where), frames_per_clip=self.clip.frames,
                                         num_clips=1, size=self.clip.size, mean=self.clip.mean, std=self.clip.std,
                                         mode=self.mode, generator=generator)
            except VideoDecodeError as error:
                self.counter.decodes[1] += 1
                self.counter.skip("decode_error", where, str(error)[len(where) + 2:][:200])
                continue
            if clips.info.num_frames < self.clip.frames:
                self.counter.skip("too_short", where, f"{clips.info.num_frames} frames, {self.clip.frames} asked for")
                continue
            self.counter.used()
            yield {"video": clips.clips[0], "caption": caption, "key": key, "url": url}


def collate_shards(items: list[dict]) -> dict:
    return {
        "video": torch.stack([item["video"] for item in items]),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
        "urls": [item["url"] for item in items],
    }


class TallyBatches:
    """The last pipeline stage: each batch carries the reader's counts since the previous one, and the
    stream ends with one tally item (``"tally": True``) holding the rest, the examples and ``gave_up``.

    Counting after batching (all stages run in the reader's process) also counts the samples
    of a dropped partial last batch, and the skips of a reader that never fills a batch.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            yield {**batch, **self.counter.take()}
        yield {"tally": True, **self.counter.take(), "examples": dict(self.counter.examples),
               "gave_up": self.counter.gave_up}


class StreamAccount:
    """The trainer's side of :class:`TallyBatches`: adds every reader's counts to ``skipped`` (this rank's
    per-reason counter), hands the batches on and keeps the tallies out of the training loop.

    The decode counts of a tally go with the next batch (so the failure monitor sees them);
    a reader that gave up ends this rank's stream, and ``gave_up`` says why.
    """

    def __init__(self, skipped: Counter):
        self.skipped = skipped
        self.examples: dict[str, str] = {}
        self.gave_up: str | None = None
        self.clips = 0  # usable clips the readers produced this epoch, batched or not
        self.pending = [0, 0]

    def batches(self, items) -> Iterator[dict]:
        """One epoch's stream: its batches, with every tally taken out."""
        self.clips = 0
        for item in items:
            self.skipped.update(item["skipped"])
            self.clips += item["clips"]
            if not item.get("tally"):
                item["attempts"] += self.pending[0]
                item["failures"] += self.pending[1]
                self.pending = [0, 0]
                yield item
                continue
            self.pending[0] += item["attempts"]
            self.pending[1] += item["failures"]
            for reason, example in item["examples"].items():
                self.examples.setdefault(reason, example)
            if item["gave_up"]:
                self.gave_up = self.gave_up or item["gave_up"]
                return

    def no_batch_message(self, epoch: int, batch_size: int, world_size: int) -> str:
        where = " on some rank" if world_size > 1 else ""
        counts = {reason: self.skipped.get(reason, 0) for reason in SKIP_REASONS}
        return (f"epoch {epoch}: the shards gave no batch of {batch_size} usable clips{where}; this rank's readers "
                f"found {self.clips} usable clips and skipped (so far): {describe_skips(counts, self.examples)}")


def epoch_seed(seed: int, epoch: int, restart: int = 0) -> int:
    """A 31-bit seed for an epoch's shard order (``restart``: the position a resumed pass starts from)."""
    return sample_seed(seed, epoch, 0x5EED, restart) & 0x7FFFFFFF


def shard_pipeline(source: ShardSource, clip: ClipSettings, batch_size: int, *, epoch: int, seed: int,
                   resampled: bool, caption_key: str | None = None, restart: int = 0,
                   max_consecutive_skips: int | None = MAX_CONSECUTIVE_SKIPS) -> wds.DataPipeline:
    """One epoch of batches of this rank (the rank and worker come from the environment, as webdataset reads them),
    each reader's stream ending with its tally (:class:`TallyBatches`).

    ``restart`` > 0 re-deals the epoch's shards in a new order: a resumed run
    cannot tell which samples of a partly read shard were used (see docs/training.md).
    """
    counter = SkipCounter(max_consecutive_skips)
    handler = ShardErrorHandler(counter)
    order_seed = epoch_seed(seed, epoch, restart)
    if resampled:
        streams = [wds.DataPipeline(wds.ResampledShards(part, seed=order_seed + index, deterministic=True),
                                    wds.tarfile_to_samples(handler=handler))
                   for index, part in enumerate(source.parts)]
        # upsampling as open_clip: each shard drawn in proportion to its part's factor
        head = streams[0] if len(streams) == 1 else wds.RandomMix(
            streams, [f * len(p) for f, p in zip(source.factors, source.parts)])
        stages = [head]
    else:
        urls = source.urls
        stages = [wds.SimpleShardList(urls), wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=order_seed),
                  wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(handler=handler)]
    return wds.DataPipeline(*stages, DecodeSamples(clip, caption_key, seed, epoch, counter),
                            wds.batched(batch_size, collation_fn=collate_shards, partial=False),
                            TallyBatches(counter))


def shard_loader(pipeline: wds.DataPipeline, workers: int, seed: int, pin_memory: bool = False) -> wds.WebLoader:
    # a private generator: worker seeds (python's random, used by RandomMix) come from it, not from the global RNG
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                         prefetch_factor=2 if workers > 0 else None)


def readers_check(source: ShardSource, world_size: int, workers: int, resampled: bool) -> None:
    """Without resampling every reader (rank x worker) needs a shard of its own; refuses before any model loads."""
    readers = world_size * max(1, workers)
    if not resampled and len(source.urls) < readers:
        raise DataError(f"{len(source.urls)} shards for {world_size} ranks x {max(1, workers)} workers = "
                        f"{readers} readers: without --dataset-resampled every reader needs a shard of its "
                        f"own; use fewer --workers, more shards or --dataset-resampled")


class ShardTrainData:
    """The trainer's view of a shard stream: a fixed epoch length and one loader per (epoch, restart)."""

    def __init__(self, source: ShardSource, clip: ClipSettings, *, batch_size: int, world_size: int, workers: int,
                 num_samples: int, resampled: bool, seed: int, caption_key: str | None = None,
                 max_consecutive_skips: int | None = MAX_CONSECUTIVE_SKIPS):
        readers_check(source, world_size, workers, resampled)
        self.max_consecutive_skips = max_consecutive_skips
        self.source, self.clip, self.batch_size = source, clip, batch_size
        self.workers, self.resampled, self.seed, self.caption_key = workers, resampled, seed, caption_key
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"--train-num-samples {num_samples} is less than one global batch "
                            f"({batch_size} x {world_size} ranks)")

    def loader(self, epoch: int, restart: int = 0, pin_memory: bool = False) -> wds.WebLoader:
        """The epoch's batches and, per reader, a final tally item: read it through :class:`StreamAccount`."""
        pipeline = shard_pipeline(self.source, self.clip, self.batch_size, epoch=epoch, seed=self.seed,
                                  resampled=self.resampled, caption_key=self.caption_key, restart=restart,
                                  max_consecutive_skips=self.max_consecutive_skips)
        return shard_loader(pipeline, self.workers, epoch_seed(self.seed, epoch, restart), pin_memory)


def read_shard_records(source: ShardSource, caption_key: str | None = None,
                       limit: int | None = None) -> list[VideoRecord]:
    """Every usable sample of the shards (the first ``limit``) as an in-memory record (evaluation sets:
    thousands of clips, not millions; the trainer's diagnostics batch)."""
    counter = SkipCounter()
    records = []
    pipeline = wds.DataPipeline(wds.SimpleShardList(source.urls),
                                wds.tarfile_to_samples(handler=ShardErrorHandler(counter)))
    for sample in pipeline:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        caption = sample_caption(sample, caption_key)
        if not sample.get("mp4") or not caption:
            counter.skip("no_video" if not sample.get("mp4") else "no_caption", where)
            continue
        records.append(VideoRecord(video=VideoBytes(sample["mp4"], where), captions=[caption]))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{source.spec}: no sample with a video and a caption; skipped: "
                        f"{describe_skips(counter.total, counter.examples)}")
    return records
