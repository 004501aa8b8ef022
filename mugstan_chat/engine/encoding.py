"""The video tower and LLaVA's projector over decoded clips: one call for one video or for many.

A batch run (``mugstan-chat batch --batch-size N``) hands the tower several videos' clips at once; a
conversation hands it its own. Either way the features of one video are those its clips alone give,
because the temporal branch mixes frames within a clip, never across clips.
"""

from __future__ import annotations

import dataclasses
import time

import torch


@dataclasses.dataclass
class EncodedClips:
    """One video's clips through the tower and the projector: C tensors (tokens per clip, text width)."""

    features: list[torch.Tensor]
    temporal: str  # the temporal mode they were encoded with
    encode_ms: float  # this video's share of the tower call (the call's time / the videos in it)


def encode_clips(chat_model, videos: list[torch.Tensor], temporal: str,
                 frames_as_images: bool = False) -> list[EncodedClips]:
    """Several videos' decoded clips ((C_i, T, 3, H, W) each) in ONE tower + projector call, split per video.

    The tower sees the clips of every video as one batch of sum(C_i) clips; each clip is encoded on its
    own frames (the temporal branch mixes frames within a clip, never across clips), so a video's features
    are the ones a call with its clips alone gives, up to fp32 rounding of the larger matrix products.
    ``frames_as_images``: every frame its own one-frame clip (C_i x T features for video i).
    """
    if frames_as_images:
        videos = [clips.flatten(0, 1)[:, None] for clips in videos]  # (C*T, 1, 3, H, W): every frame one image
    shapes = {tuple(clips.shape[1:]) for clips in videos}
    if len(shapes) > 1:
        raise ValueError(f"videos encoded together need clips of one shape (T, 3, H, W); got {sorted(shapes)}")
    counts = [int(clips.shape[0]) for clips in videos]
    t0 = time.perf_counter()
    tower = chat_model.tower
    with torch.inference_mode():
        pixels = torch.cat(list(videos), dim=0).to(device=tower.device, dtype=tower.dtype)
        output = chat_model.model.model.get_image_features(pixel_values=pixels, temporal_mode=temporal,
                                                           return_dict=True)
        features = [f.detach() for f in output.pooler_output]  # sum(C_i) x (tokens, text width)
    if tower.device.type == "cuda":
        torch.cuda.synchronize(tower.device)
    share = (time.perf_counter() - t0) * 1000 / max(1, len(videos))
    out, at = [], 0
    for count in counts:
        out.append(EncodedClips(features[at:at + count], temporal, share))
        at += count
    return out
