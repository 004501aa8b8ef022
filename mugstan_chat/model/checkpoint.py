"""Checkpoint files: a JSON config plus safetensors weights, loadable by path or hub id; never pickle.

A branch trained on a frozen, named backbone is saved alone, with a fingerprint
of the tower it was trained on, so loading it onto a different tower fails
with a message that names every mismatching field.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mugstan-chat"


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def fingerprint_mismatches(saved: dict, actual: dict) -> list[str]:
    """Fields of a backbone fingerprint that differ, as 'field: saved X, tower Y' strings."""
    return [f"{key}: branch trained with {saved[key]}, tower has {actual.get(key)}"
            for key in sorted(saved) if actual.get(key) != saved[key]]


def check_fingerprint(saved: dict, actual: dict, source: str, ignore: tuple[str, ...] = ()) -> None:
    """Raises :class:`CheckpointError` when a branch's recorded tower differs from ``actual``."""
    problems = [p for p in fingerprint_mismatches(saved, actual) if p.split(":")[0] not in ignore]
    if problems:
        raise CheckpointError(f"STAN branch {source} was trained on a different backbone: " + "; ".join(problems))


def _atomic_write(path: Path, write) -> None:
    """Writes through a temp file in the same folder, then renames: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(directory: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, downloading ``path_or_id`` from the Hugging Face hub if it is not one."""
    local = Path(path_or_id)
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local} is a file; a checkpoint is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(f"checkpoint {path_or_id} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as error:  # offline, missing repo, no permission: one clear line
        raise CheckpointError(f"cannot get checkpoint {path_or_id} from the hub: {error}") from error


def load_checkpoint(path_or_id: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """Reads (config, state dict, directory) of a checkpoint directory or hub id."""
    directory = resolve_checkpoint(path_or_id)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path_or_id} has no {path.name}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a mugstan-chat checkpoint (format={config.get('format')!r})")
    try:
        state = load_file(str(weights_path))
    except Exception as error:
        raise CheckpointError(f"cannot read {weights_path}: {error}") from error
    return config, state, directory
