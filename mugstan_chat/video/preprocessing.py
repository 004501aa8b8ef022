"""Preprocessing decoded frames to CLIP-normalised tensors, honouring a transformers image processor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Random-resized-crop parameters for training (area fraction, aspect ratio).
TRAIN_CROP_SCALE = (0.5, 1.0)
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class PreprocessSettings:
    """Image-processor settings honoured by :func:`preprocess_frames`.

    size: output crop side; resize_to: shortest side after resize (eval);
    center_crop: crop the centre (else squash to size x size);
    interpolation: "bicubic" | "bilinear" | "nearest"; rescale_factor: usually 1/255.
    """

    size: int = 224
    resize_to: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    center_crop: bool = True
    interpolation: str = "bicubic"
    rescale_factor: float = 1.0 / 255.0

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`preprocess_frames`."""
        return dict(
            size=self.size,
            mean=self.mean,
            std=self.std,
            resize_to=self.resize_to,
            center_crop=self.center_crop,
            interpolation=self.interpolation,
            rescale_factor=self.rescale_factor,
        )


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode  # noqa: PLC0415

    return {
        "bicubic": InterpolationMode.BICUBIC,
        "bilinear": InterpolationMode.BILINEAR,
        "nearest": InterpolationMode.NEAREST,
    }[name]


def _as_nchw_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must have shape (N, H, W, 3), got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {tensor.dtype}")
    return tensor.permute(0, 3, 1, 2)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop like transformers (top = floor((h - size) / 2)); zero-pads if smaller."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        pad_w, pad_h = max(0, size - w), max(0, size - h)
        x = torch.nn.functional.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _random_crop_box(height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (top, left, h, w) drawn from ``generator``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(TRAIN_CROP_RATIO, dtype=torch.float64))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        target = area * (TRAIN_CROP_SCALE[0] + u[0].item() * (TRAIN_CROP_SCALE[1] - TRAIN_CROP_SCALE[0]))
        ratio = math.exp(log_ratio[0].item() + u[1].item() * (log_ratio[1] - log_ratio[0]).item())
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            pos = torch.rand(2, generator=generator, dtype=torch.float64)
            return int(pos[0] * (height - h + 1)), int(pos[1] * (width - w + 1)), h, w
    side = min(height, width)  # fallback: centre square
    return (height - side) // 2, (width - side) // 2, side, side


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
    generator: torch.Generator | None = None,
    *,
    resize_to: int | None = None,
    center_crop: bool = True,
    interpolation: str = "bicubic",
    rescale_factor: float = 1.0 / 255.0,
) -> torch.Tensor:
    """CLIP preprocessing of a clip as batched tensor ops.

    eval: resize the shortest side to ``resize_to`` (default ``size``; bicubic,
    antialias), centre crop to ``size``, normalise. train: resize the shortest side
    to round(size * 256 / 224), then one random resized crop (scale
    TRAIN_CROP_SCALE, ratio TRAIN_CROP_RATIO, drawn from ``generator``) applied to
    every frame (temporal consistency), then normalise.

    Args:
        frames: uint8 RGB (N, H, W, 3), numpy or torch.
        size: output side.
        mean, std: per-channel normalisation (after multiplying by ``rescale_factor``).
        center_crop: eval only; False squashes the frame to size x size instead.

    Returns:
        float32 tensor (N, 3, size, size).
    """
    from torchvision.transforms.v2 import functional as F  # noqa: PLC0415

    x = _as_nchw_uint8(frames)
    mode = _interpolation(interpolation)
    if train:
        x = F.resize(x, [round(size * 256 / 224)], interpolation=mode, antialias=True)
        top, left, h, w = _random_crop_box(x.shape[-2], x.shape[-1], generator)
        x = F.resized_crop(x, top, left, h, w, [size, size], interpolation=mode, antialias=True)
    elif not center_crop:
        x = F.resize(x, [size, size], interpolation=mode, antialias=True)
    else:
        short = resize_to or size
        if min(x.shape[-2:]) != short:
            x = F.resize(x, [short], interpolation=mode, antialias=True)
        x = _center_crop(x, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.to(torch.float32) * rescale_factor - mean_t) / std_t


def _field(obj: Any, key: str) -> Any:
    """Read ``key`` from a dict, a transformers SizeDict, or an int (square)."""
    if obj is None or isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _resample_name(resample: Any) -> str:
    if resample is None:
        return "bicubic"
    name = getattr(resample, "value", resample)
    if isinstance(name, int):
        return _RESAMPLE.get(name, "bicubic")
    return str(name).lower() if str(name).lower() in ("nearest", "bilinear", "bicubic") else "bicubic"


def processor_settings(image_processor: Any) -> PreprocessSettings:
    """Read size, crop, mean, std, centre-crop and resample from a transformers
    ``CLIPImageProcessor`` so LLaVA's own processor settings are honoured.

    Handles ``size={"shortest_edge": 336}`` / ``crop_size={"height": 336, "width": 336}``
    (dicts or SizeDicts) and plain ints.
    """
    size_cfg = getattr(image_processor, "size", None)
    crop_cfg = getattr(image_processor, "crop_size", None)
    shortest = _field(size_cfg, "shortest_edge") if not isinstance(size_cfg, int) else size_cfg
    shortest = shortest or _field(size_cfg, "height") or 224
    crop = _field(crop_cfg, "height") if not isinstance(crop_cfg, int) else crop_cfg
    do_crop = bool(getattr(image_processor, "do_center_crop", True))
    crop = int(crop or shortest) if do_crop else int(shortest)
    do_norm = getattr(image_processor, "do_normalize", True)
    do_rescale = getattr(image_processor, "do_rescale", True)
    return PreprocessSettings(
        size=crop,
        resize_to=int(shortest),
        mean=tuple(float(v) for v in image_processor.image_mean) if do_norm else (0.0, 0.0, 0.0),
        std=tuple(float(v) for v in image_processor.image_std) if do_norm else (1.0, 1.0, 1.0),
        center_crop=do_crop,
        interpolation=_resample_name(getattr(image_processor, "resample", None)),
        rescale_factor=float(getattr(image_processor, "rescale_factor", 1 / 255)) if do_rescale else 1.0,
    )
