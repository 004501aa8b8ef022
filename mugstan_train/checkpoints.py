"""Training checkpoints: everything needed to resume exactly, written atomically; no pickle.

Layout under ``OUTPUT/checkpoints``::

    step_00001000/model.safetensors      trained weights (full model, or ``stan.*`` with a frozen backbone)
    step_00001000/optimizer.safetensors  AdamW moments, keyed "<param index>.<name>"
    step_00001000/rng.safetensors        torch RNG states of every rank
    step_00001000/state.json             step, epoch, data position, schedule, scaler, counters, ...
    step_00001000/manifest.json          size and SHA-256 of each file above, written last
    latest                               name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder (files flushed to disk)
that is renamed into place only once complete, and ``latest`` is replaced
(write + rename) after that: a process killed mid-write leaves the previous
checkpoint as ``latest``. Only the last ``keep`` checkpoints are kept.

Damage after the write (a truncated or altered file, a disk that lost blocks) is
found by the manifest, before anything is parsed: ``--resume auto``/``latest``
names each damaged checkpoint and resumes from the newest intact one, and refuses
(never starts afresh) when every checkpoint is damaged. A checkpoint written before
manifests existed is taken as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT = "mugstan-train-checkpoint"
LATEST = "latest"
PREFIX = "step_"
MANIFEST = "manifest.json"


class TrainingCheckpointError(Exception):
    """A training checkpoint is missing, incomplete, or does not fit the run resuming from it."""


@dataclass
class TrainingCheckpoint:
    """What :func:`load_training_checkpoint` returns."""

    directory: Path
    model: dict[str, torch.Tensor]
    optimizer: dict  # a torch optimizer state dict
    rng: dict[str, torch.Tensor]  # "rank{r}.cpu", "rank{r}.cuda"
    state: dict  # the JSON part


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file (its own function so tests can make it fail midway)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    """Flushes every file of ``directory`` to disk and records its size and SHA-256 in ``manifest.json``."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    _write_json({"format": FORMAT, "files": files}, directory / MANIFEST)
    _fsync(directory / MANIFEST)


def checkpoint_damage(directory: str | os.PathLike) -> str | None:
    """Why the checkpoint in ``directory`` cannot be trusted (a file missing, of the wrong size or hash, an
    unreadable manifest), or None when it is intact. Without a manifest (older checkpoints) only state.json's
    presence is checked."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None if (directory / "state.json").is_file() else "no state.json and no manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, size, digest in entries:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for group in rest["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and ((p / "state.json").is_file() or (p / MANIFEST).is_file())]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_training_checkpoint(root: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                             optimizer_state: dict, rng: dict[str, torch.Tensor], state: dict,
                             keep: int = 3) -> Path:
    """Writes checkpoint ``step`` atomically, points ``latest`` at it and prunes to the last ``keep``.

    Returns:
        the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        opt_tensors, opt_rest = _split_optimizer(optimizer_state)
        _write_tensors(model_state, tmp / "model.safetensors")
        _write_tensors(opt_tensors, tmp / "optimizer.safetensors")
        _write_tensors(rng, tmp / "rng.safetensors")
        _write_json({"format": FORMAT, **state, "step": step, "optimizer": opt_rest}, tmp / "state.json")
        write_manifest(tmp)
        if final.exists():  # the same step saved again (e.g. epoch end on a save interval)
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer_tmp = root / f".tmp-{LATEST}"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / LATEST)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(spec: str, root: str | os.PathLike) -> Path | None:
    """``latest`` or ``auto`` -> the newest intact checkpoint under ``root`` (None when there is none); else a path.

    A damaged checkpoint (see :func:`checkpoint_damage`) is named in a warning and passed over for the one
    before it; when checkpoints exist but all are damaged, or a named one is, this raises rather than let the
    run start from scratch.
    """
    root = Path(root)
    if spec not in ("latest", "auto"):
        path = Path(spec)
        if path.is_dir() and path.name == "checkpoints" and (path / LATEST).is_file():
            return resolve_resume("latest", path)
        if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
            raise TrainingCheckpointError(f"--resume {spec}: not a training checkpoint (no state.json)")
        damage = checkpoint_damage(path)
        if damage:
            raise TrainingCheckpointError(f"--resume {spec}: the checkpoint is damaged: {damage}")
        return path
    candidates = checkpoint_dirs(root)[::-1]  # newest first
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target in candidates:
            candidates.remove(target)
            candidates.insert(0, target)
        else:
            logger.warning("%s points at missing %s; using the newest complete checkpoint", pointer, target)
    damaged = []
    for candidate in candidates:
        damage = checkpoint_damage(candidate)
        if damage is None:
            if damaged:
                logger.warning("--resume %s: resuming from %s, the newest intact checkpoint", spec, candidate.name)
            return candidate
        damaged.append(f"{candidate.name}: {damage}")
        logger.warning("checkpoint %s is damaged (%s); trying the one before it", candidate, damage)
    if damaged:
        raise TrainingCheckpointError(f"--resume {spec}: every checkpoint in {root} is damaged ("
                                      f"{'; '.join(damaged)}); remove them to start afresh, or resume from a copy")
    return None


def load_training_checkpoint(directory: str | os.PathLike) -> TrainingCheckpoint:
    """Reads a checkpoint written by :func:`save_training_checkpoint` (safetensors + JSON only)."""
    directory = Path(directory)
    try:
        state = json.loads((directory / "state.json").read_text())
        if state.get("format") != FORMAT:
            raise TrainingCheckpointError(f"{directory} is not a training checkpoint (format={state.get('format')!r})")
        model = load_file(str(directory / "model.safetensors"))
        optimizer = _join_optimizer(load_file(str(directory / "optimizer.safetensors")), state.pop("optimizer"))
        rng = load_file(str(directory / "rng.safetensors"))
    except TrainingCheckpointError:
        raise
    except Exception as error:  # missing file, truncated safetensors, bad JSON: one clear line
        raise TrainingCheckpointError(f"cannot read training checkpoint {directory}: {error}") from error
    return TrainingCheckpoint(directory=directory, model=model, optimizer=optimizer, rng=rng, state=state)
