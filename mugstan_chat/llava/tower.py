"""The video tower: LLaVA's own frozen CLIP tower plus a STAN branch, swapped into LLaVA (docs/design.md section 4).

transformers' ``LlavaModel.get_image_features`` calls ``vision_tower(pixel_values,
return_dict=True, ...)``, takes ``hidden_states[vision_feature_layer]``, drops
[CLS] under the "default" strategy and projects. :class:`VideoTower` replaces
``model.model.vision_tower`` and answers that call for video: given C clips of T
frames it runs CLIP layers 0..f on every frame (f = the layer LLaVA reads), runs
STAN beside them and fuses at f (``stan`` mode) or not (``mean`` mode), and
averages the tokens over the T frames. Each clip becomes L+1 tokens, exactly one
image's worth, so each clip fills one ``<image>`` placeholder and LLaVA's own
layer selection, [CLS] drop, projector and placeholder check run unchanged.

All temporal math (fusion, temporal mean) comes from :mod:`mugstan_chat.model.stan`.

Letters in shape comments: C clips, T frames, L patches, D width.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..model.backbone import HFCLIPVision
from ..model.checkpoint import CheckpointError, load_checkpoint
from ..model.dual_encoder import build_stan_branch
from ..model.stan import STAN, StanConfig, encode_video_tokens, temporal_mean

logger = logging.getLogger(__name__)

TEMPORAL_MODES = ("stan", "mean")


def resolve_feature_layer(vision_feature_layer: int, num_layers: int) -> int:
    """The 0-based backbone layer whose output is ``hidden_states[vision_feature_layer]``.

    CLIP's hidden_states has N+1 entries: entry 0 is the embedding output, entry i the
    output of layer i-1. LLaVA-1.5's -2 is entry N-1, i.e. layer N-2. Returns -1 for
    entry 0 (embeddings only).
    """
    if isinstance(vision_feature_layer, (list, tuple)):
        raise ValueError("the video tower supports one vision_feature_layer, not a list "
                         f"({vision_feature_layer})")
    entry = vision_feature_layer + num_layers + 1 if vision_feature_layer < 0 else vision_feature_layer
    if not 0 <= entry <= num_layers:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is outside a {num_layers}-layer tower")
    return entry - 1


class VideoTower(nn.Module):
    """Drop-in replacement for LLaVA's ``vision_tower`` that encodes clips.

    Args:
        vision_tower: LLaVA's ``CLIPVisionModel`` (wrapped, not copied; stays frozen).
        stan: a STAN branch built on this tower (see :func:`load_stan_branch`), or None.
        vision_feature_layer: LLaVA's ``config.vision_feature_layer`` (an int).
        mode: "stan" (branch fused at the feature layer) or "mean" (temporal mean of plain
            CLIP features, no branch needed).
    Input to forward:
        (C, T, 3, H, W) clips, or (N, 3, H, W) images, which run as plain CLIP (no branch),
        so stock image chat is unchanged.
    Output:
        ``BaseModelOutputWithPooling`` whose ``hidden_states[vision_feature_layer]`` is
        (C, L+1, D); the other entries are None (those layers are never computed).
    """

    def __init__(self, vision_tower: nn.Module, stan: STAN | None, vision_feature_layer: int, mode: str = "stan"):
        super().__init__()
        if mode not in TEMPORAL_MODES:
            raise ValueError(f"temporal mode must be one of {TEMPORAL_MODES}, got {mode!r}")
        self.backbone = HFCLIPVision(vision_tower)
        self.feature_layer = resolve_feature_layer(vision_feature_layer, self.backbone.num_layers)
        self.vision_feature_layer = vision_feature_layer
        if mode == "stan" and stan is None:
            raise ValueError("temporal mode 'stan' needs a STAN branch; use mode 'mean' without one")
        if stan is not None:
            if stan.fuse_layer != self.feature_layer:
                raise CheckpointError(f"STAN branch fuses at layer {stan.fuse_layer} but LLaVA reads the output of "
                                      f"layer {self.feature_layer}; it must be trained with that fuse layer")
        self.stan = stan
        self.mode = mode
        self.calls = 0  # forward calls, for callers that want to verify caching
        for param in self.parameters():
            param.requires_grad_(False)

    # attributes LLaVA and generation utilities may read from a vision tower
    @property
    def config(self):
        return self.backbone.vision_model.config

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.position_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.position_embedding.device

    @property
    def available_modes(self) -> list[str]:
        return list(TEMPORAL_MODES) if self.stan is not None else ["mean"]

    @property
    def tokens_per_clip(self) -> int:
        """L+1: what the tower hands LLaVA per clip, whatever T is."""
        return self.backbone.num_patches + 1

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, temporal_mode: str | None = None,
                **kwargs):
        """``temporal_mode`` overrides :attr:`mode` for this call only ("stan" or "mean"); callers
        sharing one model (a server) pass it instead of mutating the tower. It reaches the tower
        through ``get_image_features(..., temporal_mode=...)``. Other kwargs (LLaVA's
        ``output_hidden_states`` etc.) are ignored."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        mode = self.mode if temporal_mode is None else temporal_mode
        if mode not in TEMPORAL_MODES or (mode == "stan" and self.stan is None):
            raise ValueError(f"temporal mode {mode!r} is not available (modes: {self.available_modes})")
        self.calls += 1
        if pixel_values.dim() == 4:  # images: (N, 3, H, W) -> N clips of one frame, plain CLIP
            clips, stan = pixel_values[:, None], None
        elif pixel_values.dim() == 5:  # (C, T, 3, H, W)
            clips, stan = pixel_values, (self.stan if mode == "stan" else None)
        else:
            raise ValueError(f"video tower expects (C, T, 3, H, W) clips or (N, 3, H, W) images, "
                             f"got shape {tuple(pixel_values.shape)}")
        if self.feature_layer < 0:  # LLaVA reads the embedding output: nothing for STAN to fuse into
            if stan is not None:
                raise ValueError("STAN cannot fuse into the embedding output (vision_feature_layer=0)")
            tokens = self.backbone.embed(clips.flatten(0, 1)).unflatten(0, clips.shape[:2])
        else:
            tokens = encode_video_tokens(self.backbone, stan, clips, stop_at=self.feature_layer)  # (C, T, L+1, D)
        features = temporal_mean(tokens, dim=1)  # (C, L+1, D)
        hidden_states = [None] * (self.backbone.num_layers + 1)
        hidden_states[self.feature_layer + 1] = features
        output = BaseModelOutputWithPooling(last_hidden_state=features, hidden_states=tuple(hidden_states))
        return output if return_dict else output.to_tuple()

    def extra_repr(self) -> str:
        return f"mode={self.mode}, feature_layer={self.feature_layer}"


def load_stan_branch(source: str | os.PathLike, vision_tower: nn.Module, vision_feature_layer: int,
                     allow_image_size_mismatch: bool = False) -> STAN:
    """Loads a saved branch (directory or hub id) onto LLaVA's tower, checking it fits.

    The branch's recorded tower fingerprint (width, layers, heads, patch size, image
    size, fuse layer) must equal this tower's, and its fuse layer must be the layer
    LLaVA reads. ``allow_image_size_mismatch`` lets a branch trained at another
    resolution through (e.g. the 224 px L/14 branch on LLaVA-1.5's 336 px tower): the
    shapes fit, since STAN takes position embeddings from the tower, but the branch
    sees a token grid it was not trained on, a known domain shift.

    Raises:
        CheckpointError: missing/unreadable checkpoint, or a branch that does not fit.
    """
    config, state, _ = load_checkpoint(source)
    model_config = config.get("model") or {}
    if not model_config.get("stan"):
        raise CheckpointError(f"{source} holds no STAN branch (its config has no 'stan' section)")
    stan_config = StanConfig(**model_config["stan"])
    backbone = HFCLIPVision(vision_tower)
    feature_layer = resolve_feature_layer(vision_feature_layer, backbone.num_layers)
    fingerprint = dict(config.get("backbone_fingerprint") or {})
    ignore = ("image_size",) if allow_image_size_mismatch else ()
    try:
        stan_fuse = stan_config.resolved_fuse_layer(backbone.num_layers)
    except ValueError as error:
        raise CheckpointError(f"STAN branch {source} does not fit this tower: {error}") from error
    if stan_fuse != feature_layer or fingerprint.get("fuse_layer", stan_fuse) != feature_layer:
        raise CheckpointError(
            f"STAN branch {source} fuses at layer {fingerprint.get('fuse_layer', stan_fuse)} but LLaVA reads the "
            f"output of layer {feature_layer} (vision_feature_layer={vision_feature_layer}); "
            "train the branch with that fuse layer")
    if allow_image_size_mismatch and fingerprint.get("image_size") not in (None, backbone.image_size):
        logger.warning("STAN branch %s was trained at %s px and runs on a %s px tower: known domain shift",
                       source, fingerprint["image_size"], backbone.image_size)
    branch = {k: v for k, v in state.items() if k.startswith("stan.")}
    if not branch:
        raise CheckpointError(f"{source} has no 'stan.*' weights")
    stan = build_stan_branch(backbone, stan_config, branch, fingerprint, str(source), ignore=ignore)
    stan.trained_fingerprint = fingerprint  # the tower it was trained on, for notices
    param = backbone.position_embedding
    return stan.to(device=param.device, dtype=param.dtype).eval()


def install_video_tower(model: nn.Module, stan: STAN | None = None, mode: str = "stan") -> VideoTower:
    """Replaces ``model.model.vision_tower`` of a ``LlavaForConditionalGeneration`` with a :class:`VideoTower`.

    The tower keeps LLaVA's CLIP weights (wrapped, not copied). Installing twice
    re-wraps the original CLIP tower. Returns the installed tower.
    """
    base = model.model
    current = base.vision_tower
    clip = current.backbone.vision_model if isinstance(current, VideoTower) else current
    if stan is not None:
        param = next(clip.parameters())
        stan = stan.to(device=param.device, dtype=param.dtype).eval()
    tower = VideoTower(clip, stan, model.config.vision_feature_layer, mode=mode)
    base.vision_tower = tower
    return tower


def uninstall_video_tower(model: nn.Module) -> None:
    """Puts LLaVA's own CLIP tower back (stock image inference)."""
    if isinstance(model.model.vision_tower, VideoTower):
        model.model.vision_tower = model.model.vision_tower.backbone.vision_model
