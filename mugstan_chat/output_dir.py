"""Output folders that are never half-written and never replaced by accident (export-llava, mugstan-make-shards).

A command that writes a folder checks it first, before any slow work (:func:`output_dir_problem`:
a file in the way, or a folder that is not empty without ``--overwrite``), then writes into a
hidden temporary sibling (:func:`atomic_output_dir`) that takes the folder's place only once
complete: an interrupted command leaves the old folder (or none) and at most a hidden
``.NAME.tmp-*`` sibling, never a mix of old and new files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def output_dir_problem(path: str | os.PathLike, overwrite: bool, flag: str) -> str | None:
    """Why ``path`` may not be written as an output folder (one line naming ``flag`` and the path), or None."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            return f"{flag} {path} is a broken symbolic link"
        return None
    if not path.is_dir():
        return f"{flag} {path} exists and is not a folder; name a new folder"
    if not overwrite and any(path.iterdir()):
        return f"{flag} {path} is not empty; pass --overwrite to replace it, or name a new folder"
    return None


@contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``path``; on success it replaces ``path`` (the old folder, if any,
    is moved aside first and deleted after), on an exception it is deleted and ``path`` is untouched.

    Check :func:`output_dir_problem` first: this replaces whatever folder ``path`` holds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-")) / path.name
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
