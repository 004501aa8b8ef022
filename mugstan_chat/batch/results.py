"""The output of a batch run: one JSON row per video, appended whole, resumable, never replaced by accident.

Why rows are appended one ``write`` each (``O_APPEND``, flushed to disk): a run killed at any moment
leaves every finished row intact and at most one torn last line, which a resumed run drops before
it goes on; ids already in the file are not done again. The run's settings are kept beside the
rows (``OUT.run.json``): a resume with other settings (prompt, model, clips) is refused, since its
rows would mix two runs; ``--overwrite`` starts over.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class ResultsError(ValueError):
    """The output file cannot be used as asked; one line naming it."""


def settings_path(path: Path) -> Path:
    return path.with_name(path.name + ".run.json")


class ResultsFile:
    """Rows of one run (``id`` keyed); :meth:`open` first, then :meth:`append` per finished video."""

    def __init__(self, path: str | os.PathLike, settings: dict, overwrite: bool = False):
        self.path = Path(path)
        self.settings = settings
        self.overwrite = overwrite
        self.rows: list[dict] = []
        self._fd: int | None = None

    def check(self) -> None:
        """Before any model loads: a folder in the way, a run with other settings, an unwritable place."""
        if self.path.is_dir():
            raise ResultsError(f"--out {self.path} is a folder; name a .jsonl file")
        if not self.path.parent.exists():
            raise ResultsError(f"--out {self.path}: the folder {self.path.parent} does not exist")
        if self.path.exists() and not self.overwrite:
            saved = self._saved_settings()
            changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            if changed:
                raise ResultsError(f"--out {self.path} holds a run with other settings ({', '.join(changed)}); "
                                   "pass --overwrite to start over, or name another file")

    def _saved_settings(self) -> dict:
        try:
            return json.loads(settings_path(self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ResultsError(f"--out {self.path} exists but was not written by mugstan-chat batch (no "
                               f"{settings_path(self.path).name}); pass --overwrite to replace it") from None
        except (OSError, json.JSONDecodeError) as error:
            raise ResultsError(f"{settings_path(self.path)}: cannot read ({' '.join(str(error).split())})") from None

    def open(self) -> set[str]:
        """Opens for appending; returns the ids already done (a torn last line is cut off first)."""
        self.check()
        if self.overwrite or not self.path.exists():
            _write_atomically(self.path, "")
            self.rows = []
        else:
            self.rows = self._read_and_repair()
        _write_atomically(settings_path(self.path), json.dumps(self.settings, indent=2) + "\n")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return {row["id"] for row in self.rows}

    def _read_and_repair(self) -> list[dict]:
        data = self.path.read_bytes()
        rows, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn: the run stopped in the middle of this write
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(row, dict) or "id" not in row:
                break
            rows.append(row)
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
        return rows

    def append(self, row: dict) -> None:
        """One row, in one write, on disk before this returns."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.rows.append(row)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_captions(rows: list[dict], path: str | os.PathLike) -> int:
    """The answered rows as the trainer's annotations (``{"video", "caption"}`` per line; ``--train-data``);
    returns how many. Written to a temporary file and renamed: never half-written."""
    lines = [json.dumps({"video": row["video"], "caption": row["answer"]}, ensure_ascii=False) + "\n"
             for row in rows if row.get("error") is None and row.get("answer") and row.get("shard") is None]
    _write_atomically(Path(path), "".join(lines))
    return len(lines)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
