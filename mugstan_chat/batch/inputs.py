"""What a batch run reads, and the part of it this machine takes.

An input is a folder (every video below it, by extension, in sorted order), a list (``.csv`` or
``.jsonl`` with a ``video`` column, optional ``id`` and ``question``; paths relative to the list's
folder), or tar shards in video2dataset's layout (``KEY.mp4`` members; a brace spec such as
``shards/{00000..00009}.tar``). Every item has a stable id (its path relative to the input, or
``SHARD:KEY``) that a resumed run and the shards of a multi-machine run are keyed by.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..options import SUPPORTED_EXTENSIONS

LIST_SUFFIXES = (".csv", ".jsonl")
VIDEO_COLUMNS = ("video", "path", "video_path")  # the first present names the video
RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))  # torchrun's, then SLURM's


class InputError(ValueError):
    """The input cannot be read as asked; the message names the file and the problem (one line)."""


@dataclass(frozen=True)
class BatchItem:
    """One video to answer about: its id, where it is, and its own question (None: the run's prompt)."""

    id: str
    video: str  # a path, or SHARD:KEY for a shard member
    question: str | None = None
    shard: str | None = None  # the tar holding it
    member: str | None = None  # its member name in the tar

    def source(self):
        """What the video readers take: the path, or the member's bytes read now (a ``video.VideoBytes``)."""
        from ..video import VideoBytes  # the video package brings torch: not at import (``--help`` stays instant)

        if self.shard is None:
            return self.video
        with tarfile.open(self.shard) as tar:
            handle = tar.extractfile(self.member)
            if handle is None:
                raise InputError(f"{self.video}: not a file in the shard")
            return VideoBytes(handle.read(), self.video)


def read_items(spec: str) -> list[BatchItem]:
    """Every item of an input (folder, list or shards), in a fixed order; InputError (one line) if unreadable."""
    path = Path(spec)
    if spec.endswith(".tar") or "{" in spec:
        return _shard_items(spec)
    if path.is_dir():
        return _folder_items(path)
    if not path.exists():
        raise InputError(f"{spec}: no such file or folder")
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise InputError(f"{spec}: not a folder, a list ({', '.join(LIST_SUFFIXES)}) or tar shards (.tar)")
    return _list_items(path)


def _folder_items(root: Path) -> list[BatchItem]:
    videos = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(SUPPORTED_EXTENSIONS))
    if not videos:
        raise InputError(f"{root}: no videos ({', '.join(SUPPORTED_EXTENSIONS)}) in this folder")
    return [BatchItem(str(p.relative_to(root)), str(p)) for p in videos]


def _list_items(path: Path) -> list[BatchItem]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if path.suffix.lower() == ".csv":
                rows = list(csv.DictReader(handle))
            else:
                rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read ({' '.join(str(error).split())})") from None
    items, seen = [], set()
    for number, row in enumerate(rows, start=1):
        column = next((c for c in VIDEO_COLUMNS if isinstance(row, dict) and row.get(c)), None)
        if column is None:
            raise InputError(f"{path} row {number}: no video column ({', '.join(VIDEO_COLUMNS)})")
        video = str(row[column])
        item_id = str(row.get("id") or video)
        if item_id in seen:
            raise InputError(f"{path} row {number}: id {item_id!r} appears twice (ids key the results)")
        seen.add(item_id)
        full = video if os.path.isabs(video) else str(path.parent / video)
        question = row.get("question")
        items.append(BatchItem(item_id, full, str(question) if question else None))
    if not items:
        raise InputError(f"{path}: holds no rows")
    return items


def _shard_items(spec: str) -> list[BatchItem]:
    from braceexpand import braceexpand  # webdataset's own dependency

    try:
        shards = list(braceexpand(spec))
    except ValueError as error:  # unbalanced braces
        raise InputError(f"{spec}: {error} (braces list shards as {{00000..00009}})") from None
    items = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = sorted(m.name for m in tar.getmembers()
                                 if m.isfile() and m.name.lower().endswith(SUPPORTED_EXTENSIONS))
        except (OSError, tarfile.TarError) as error:
            raise InputError(f"{shard}: cannot read the shard ({' '.join(str(error).split())})") from None
        items += [BatchItem(f"{shard}:{m}", f"{shard}:{m}", shard=shard, member=m) for m in members]
    if not items:
        raise InputError(f"{spec}: the shards hold no videos")
    return items


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` (0 <= i < n) as (i, n); argparse's type for ``--shard``."""
    import argparse

    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return i, n


def this_shard(asked: tuple[int, int] | None, environ=os.environ) -> tuple[int, int]:
    """(i, n): ``--shard``, else torchrun's RANK/WORLD_SIZE, else SLURM's SLURM_PROCID/SLURM_NTASKS, else (0, 1)."""
    if asked is not None:
        return asked
    for rank, world in RANK_VARIABLES:
        if rank in environ and world in environ:
            try:
                i, n = int(environ[rank]), int(environ[world])
            except ValueError:
                raise InputError(f"${rank}={environ[rank]!r} / ${world}={environ[world]!r} are not numbers") from None
            if not 0 <= i < n:
                raise InputError(f"${rank}={i} is outside ${world}={n}")
            return i, n
    return 0, 1


def shard_items(items: list[BatchItem], shard: tuple[int, int]) -> list[BatchItem]:
    """The items shard i of n takes: every n-th in the input's order, from the i-th (disjoint, covering)."""
    i, n = shard
    return items[i::n]
