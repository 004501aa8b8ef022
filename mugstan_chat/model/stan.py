"""STAN: the Spatial-Temporal Auxiliary Network, a branch beside a CLIP ViT (docs/design.md section 1).

This module is the only place temporal math lives: building STAN's input from
backbone layer outputs, the cross-frame (temporal) and intra-frame (spatial)
modules, fusion back into the backbone tokens (paper eq. 10), the rest of the
backbone after the fuse layer, and the temporal mean used by the plain-CLIP
baseline and the LLaVA adapter.

Letters in shape comments: B clips, T frames, L patches per frame, D width.
STAN's own token layout is one video [CLS] followed by the patches of every
frame, frame-major: (B, 1 + T*L, D).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import VisionBackbone


@dataclass
class StanConfig:
    """STAN's hyper-parameters (defaults are the paper's)."""

    num_layers: int = 4  # K: 4 by default; 6 helps motion-heavy data
    fuse_layer: int = -1  # f: backbone layer whose output is fused; negative counts from the end
    max_frames: int = 64  # rows of the temporal embedding table
    # initial std of the temporal embedding: the released code's N(0, 1) (nn.Embedding's default), on the scale
    # of the backbone's hidden states; at 0.02 the order signal entering STAN is ~50x weaker and, on motions
    # beyond a few easy ones, never grows (docs/temporal_probe.md)
    temporal_embedding_std: float = 1.0
    drop_path: float = 0.1  # drop-path rate of the last STAN layer; grows linearly from 0
    dropout: float = 0.0  # dropout on STAN's input embeddings
    backbone_projection: bool = False  # paper eqs. 6-7 D x D projection of the backbone term (off: released code)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_fuse_layer(self, num_backbone_layers: int) -> int:
        """The 0-based fuse layer for a backbone of ``num_backbone_layers`` layers."""
        fuse = self.fuse_layer + num_backbone_layers if self.fuse_layer < 0 else self.fuse_layer
        if not 0 <= fuse < num_backbone_layers:
            raise ValueError(f"fuse_layer={self.fuse_layer} is outside a {num_backbone_layers}-layer backbone")
        if fuse - self.num_layers + 1 < 0:
            raise ValueError(
                f"STAN with K={self.num_layers} layers fused at layer {fuse} would read backbone layer "
                f"{fuse - self.num_layers + 1}; use a larger fuse_layer or fewer STAN layers")
        return fuse


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample (dim 0) while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class CrossFrameModule(nn.Module):
    """Temporal self-attention among the T tokens of each spatial position.

    LayerNorm -> multi-head attention over time -> drop-path (one draw per clip and
    spatial position, as the released code draws over its (B*L, T, D) batch) ->
    zero-initialised linear -> residual add. The video [CLS] passes through unchanged; there is no
    MLP. The zero-initialised linear makes a fresh module exactly the identity.
    """

    def __init__(self, width: int, heads: int, drop_path: float, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.drop_path = DropPath(drop_path)
        self.out = nn.Linear(width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        B, S, D = x.shape
        L = (S - 1) // frames
        cls, patches = x[:, :1], x[:, 1:].reshape(B, frames, L, D)  # (B, T, L, D)
        seq = patches.permute(0, 2, 1, 3).reshape(B * L, frames, D)  # (B*L, T, D)
        normed = self.norm(seq)
        attended, _ = self.attn(normed, normed, normed, need_weights=False)
        attended = self.drop_path(attended)  # one draw per (clip, position), as in the released code
        attended = attended.reshape(B, L, frames, D).permute(0, 2, 1, 3)  # (B, T, L, D)
        patches = patches + self.out(attended)
        return torch.cat([cls, patches.reshape(B, frames * L, D)], dim=1)


class IntraFrameModule(nn.Module):
    """Spatial attention within each frame, initialised from one backbone layer.

    The video [CLS] is replicated in front of each frame's L patches, the layer's
    attention sub-block runs per frame over L+1 tokens, the T [CLS] outputs are
    averaged back into one, then the layer's MLP sub-block runs over all tokens.
    Drop-path (training only) sits on the attention residual alone, one draw per
    clip and frame shared by the frame's [CLS] and patches, as in the released
    implementation (docs/design.md section 1); the MLP residual has none.
    """

    def __init__(self, layer: nn.Module, attention_branch, mlp_branch, drop_path: float):
        super().__init__()
        self.layer = layer
        # plain functions, not modules: the backbone is not a child of STAN
        self._attention_branch = attention_branch
        self._mlp_branch = mlp_branch
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        B, S, D = x.shape
        L = (S - 1) // frames
        cls, patches = x[:, :1], x[:, 1:].reshape(B, frames, L, D)  # (B, 1, D), (B, T, L, D)
        per_frame = torch.cat([cls.unsqueeze(1).expand(B, frames, 1, D), patches], dim=2)  # (B, T, L+1, D)
        attended = self._attention_branch(self.layer, per_frame.reshape(B * frames, L + 1, D))
        attended = self.drop_path(attended)  # one draw per (clip, frame), [CLS] and patches alike (released code)
        attended = attended.reshape(B, frames, L + 1, D)
        cls = cls + attended[:, :, :1].mean(dim=1)  # (B, 1, D)
        patches = patches + attended[:, :, 1:]
        x = torch.cat([cls, patches.reshape(B, frames * L, D)], dim=1)
        return x + self._mlp_branch(self.layer, x)  # no drop-path on the MLP residual (released code)


class STAN(nn.Module):
    """The K-layer branch. Built from a backbone, whose aligned layers initialise it.

    STAN layer j reads the output of backbone layer ``f - K + 1 + j`` and its
    output is fused at backbone layer f (see :func:`encode_video_tokens`).
    """

    def __init__(self, backbone: VisionBackbone, config: StanConfig | None = None):
        super().__init__()
        self.config = config or StanConfig()
        K = self.config.num_layers
        D = backbone.width
        self.fuse_layer = self.config.resolved_fuse_layer(backbone.num_layers)
        self.source_layers = [self.fuse_layer - K + 1 + j for j in range(K)]
        self.temporal_embedding = nn.Parameter(torch.empty(self.config.max_frames, D))
        nn.init.normal_(self.temporal_embedding, std=self.config.temporal_embedding_std)
        self.dropout = nn.Dropout(self.config.dropout)
        rates = torch.linspace(0.0, self.config.drop_path, K).tolist() if K > 1 else [0.0]
        self.cross_frame = nn.ModuleList(
            CrossFrameModule(D, backbone.num_heads, rates[j]) for j in range(K))
        self.intra_frame = nn.ModuleList(
            IntraFrameModule(backbone.copy_layer(self.source_layers[j]), backbone.attention_branch,
                             backbone.mlp_branch, rates[j]) for j in range(K))
        if self.config.backbone_projection:
            self.backbone_projection = nn.ModuleList(nn.Linear(D, D) for _ in range(K - 1))
        else:
            self.backbone_projection = None

    def input_embedding(self, hidden: torch.Tensor, class_embedding: torch.Tensor,
                        position_embedding: torch.Tensor) -> torch.Tensor:
        """STAN layer 0's input from backbone tokens (B, T, L+1, D) -> (B, 1 + T*L, D)."""
        B, T, S, D = hidden.shape
        if T > self.config.max_frames:
            raise ValueError(f"STAN supports at most {self.config.max_frames} frames per clip, got {T}")
        video_cls = 0.5 * (hidden[:, :, 0].mean(dim=1) + class_embedding + position_embedding[0])  # (B, D)
        patches = hidden[:, :, 1:] + position_embedding[1:] + self.temporal_embedding[:T, None]  # (B, T, L, D)
        x = torch.cat([video_cls[:, None], patches.reshape(B, T * (S - 1), D)], dim=1)
        return self.dropout(x)

    def arrange(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Backbone tokens (B, T, L+1, D) in STAN's layout, for layers j > 0."""
        B, T, S, D = hidden.shape
        x = torch.cat([hidden[:, :, 0].mean(dim=1, keepdim=True), hidden[:, :, 1:].reshape(B, T * (S - 1), D)], 1)
        if self.backbone_projection is not None:
            x = self.backbone_projection[index - 1](x)
        return x

    def layer(self, index: int, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Runs STAN layer ``index``: cross-frame then intra-frame."""
        x = self.cross_frame[index](x, frames)
        return self.intra_frame[index](x, frames)


def fuse(hidden: torch.Tensor, stan_out: torch.Tensor) -> torch.Tensor:
    """Paper eq. 10: backbone tokens (B, T, L+1, D) + STAN output (B, 1 + T*L, D) -> (B, T, L+1, D).

    The STAN video [CLS] is added to every frame's [CLS]; STAN patch (t, l) to backbone patch (t, l).
    """
    B, T, S, D = hidden.shape
    cls = stan_out[:, :1].unsqueeze(1).expand(B, T, 1, D)
    patches = stan_out[:, 1:].reshape(B, T, S - 1, D)
    return hidden + torch.cat([cls, patches], dim=2)


def encode_video_tokens(backbone: VisionBackbone, stan: STAN | None, pixel_values: torch.Tensor,
                        stop_at: int | None = None, checkpointing: bool = False) -> torch.Tensor:
    """Runs the backbone on every frame with STAN fused at its fuse layer.

    Args:
        pixel_values: (B, T, 3, H, W) clips.
        stan: the branch, or None for plain per-frame CLIP.
        stop_at: last backbone layer to compute (0-based; default: the last layer). The LLaVA
            adapter stops at its feature layer so no unused layer runs.
        checkpointing: recompute layers in backward to save memory (training).
    Returns:
        (B, T, L+1, D) tokens after layer ``stop_at``.
    """
    B, T = pixel_values.shape[:2]
    last = backbone.num_layers - 1 if stop_at is None else stop_at
    if stan is not None and last < stan.fuse_layer:
        raise ValueError(f"stop_at={last} is before STAN's fuse layer {stan.fuse_layer}")
    hidden = backbone.embed(pixel_values.flatten(0, 1))  # (B*T, L+1, D)
    S, D = hidden.shape[1:]
    stan_x = None
    for index in range(last + 1):
        hidden = _maybe_checkpoint(backbone.run_layer, index, hidden, enabled=checkpointing)
        if stan is None or index < stan.source_layers[0] or index > stan.fuse_layer:
            continue
        j = index - stan.source_layers[0]
        frames = hidden.view(B, T, S, D)
        if j == 0:
            stan_x = stan.input_embedding(frames, backbone.class_embedding, backbone.position_embedding)
        else:
            stan_x = stan_x + stan.arrange(frames, j)
        stan_x = _maybe_checkpoint(stan.layer, j, stan_x, T, enabled=checkpointing)
        if index == stan.fuse_layer:
            hidden = fuse(frames, stan_x).flatten(0, 1)
    return hidden.view(B, T, S, D)


def temporal_mean(tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Averages over the frame axis: (B, T, ...) -> (B, ...)."""
    return tokens.mean(dim=dim)


def _maybe_checkpoint(fn, *args, enabled: bool):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
