"""Recognition labels: class-name lists and the mapping of an annotation's label to a class (docs/training.md).

Shared by zero-shot recognition (``training/evaluate.py --task recognition``) and
recognition fine-tuning (:mod:`mugstan_train.recognition`), so both read the same
files the same way:

* ``--class-names``: a text file with one class name per line (Kinetics-400's
  ``k400_classes.txt``), a JSON list of names, or a JSON object mapping each name
  to its 0-based index as Something-Something v2 publishes it
  (``something-something-v2-labels.json``: ``{"Approaching something with your
  camera": "0", ...}``).
* A label is a class name, an SSv2 template whose placeholders are bracketed
  (``"Putting [something] onto [something]"``: its class is the template without
  brackets, the key of the labels file), or a 0-based class index.

The annotation layouts themselves are presets of :mod:`mugstan_train.data`
(``k400``: ``path,label``; ``ssv2``: the published train/validation JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mugstan_train.data import Columns, DataError, VideoRecord


def recognition_columns(columns: Columns) -> Columns:
    """A layout read for its labels: no caption column; the label column defaults to ``label``."""
    return dataclasses.replace(columns, caption_column=None, label_column=columns.label_column or "label")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names of a ``--class-names`` file, in class-index order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"--class-names {path}: cannot read ({error})") from error
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"--class-names {path}: not JSON ({error})") from error
        names = _names_from_json(data, path)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"--class-names {path} names no class")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"--class-names {path}: class {name!r} appears twice")
        seen.add(name)
    return names


def _names_from_json(data, path: Path) -> list[str]:
    if isinstance(data, list) and all(isinstance(name, str) for name in data):
        return [name.strip() for name in data]
    if isinstance(data, dict):
        try:
            by_index = {int(index): str(name).strip() for name, index in data.items()}
        except (TypeError, ValueError) as error:
            raise DataError(f"--class-names {path}: an object must map each class name to its index "
                            f"(something-something-v2-labels.json's layout): {error}") from error
        if sorted(by_index) != list(range(len(data))):
            raise DataError(f"--class-names {path}: the indices must be 0..{len(data) - 1}, each once")
        return [by_index[i] for i in range(len(data))]
    raise DataError(f"--class-names {path}: expected a list of names or an object of name -> index")


class ClassIndex:
    """Resolves labels (class names, bracketed SSv2 templates or 0-based indices) to class indices."""

    def __init__(self, class_names: list[str]):
        self.names = list(class_names)
        self.lookup = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def find(self, label) -> int | None:
        """The class of ``label``, or None when it names none."""
        label = str(label).strip()
        if label in self.lookup:
            return self.lookup[label]
        bare = label.replace("[", "").replace("]", "")  # SSv2: the template's class is its bracket-free text
        if bare in self.lookup:
            return self.lookup[bare]
        if label.isdigit() and int(label) < len(self.names):
            return int(label)
        return None

    def __call__(self, label, where: str) -> int:
        """Like :meth:`find`, but a label naming no class is a :class:`DataError` that says ``where`` it is."""
        index = self.find(label)
        if index is None:
            raise DataError(f"{where}: label {label!r} is neither one of the {len(self.names)} class names nor a "
                            f"class index (first classes: {self.names[:3]})")
        return index


def labelled_records(records: list[VideoRecord], classes: ClassIndex, source: str) -> list[VideoRecord]:
    """Training records whose one caption is their class name (the text the classifier scores).

    ``source`` names the annotation file in errors. A record without a label column
    value (e.g. read from shards) takes its label from its first caption.
    """
    out = []
    for record in records:
        label = record.label if record.label is not None else (record.captions[0] if record.captions else None)
        if label is None:
            raise DataError(f"{source}: video {record.video} has no label")
        name = classes.names[classes(label, f"{source}, video {record.video}")]
        out.append(VideoRecord(video=record.video, captions=[name], label=name, extra=record.extra))
    return out
