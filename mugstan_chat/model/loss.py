"""Symmetric InfoNCE over the Mug score matrix, with features gathered across ranks (docs/design.md section 3).

Every rank gathers the whole global batch with an autograd-aware all-gather and
computes the same global loss; the gradient that reaches each rank's own features
is summed over ranks, so after DDP's gradient averaging the parameters receive
exactly the gradient of the single-process loss on the concatenated batch.
rank and world size are arguments, so world size 1 needs no process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .mug import MugConfig, score_matrix


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and keeps this rank's slice.

    (torch.distributed.nn's all_gather relies on reduce_scatter/all_to_all, which gloo lacks.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int):
        ctx.rank, ctx.size = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None, None


def gather(tensor: torch.Tensor, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Concatenates ``tensor`` from every rank along dim 0 (gradients flow back to each rank's part)."""
    if world_size == 1:
        return tensor
    if tensor.dtype == torch.bool:  # gloo cannot gather bool tensors
        return gather(tensor.to(torch.uint8), rank, world_size).bool()
    if tensor.requires_grad:
        return _AllGather.apply(tensor, rank, world_size)
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def symmetric_infonce(scores: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """Text-to-video plus video-to-text cross-entropy over a square (B, B) score matrix.

    Each direction is averaged over the batch and the two are added (not averaged), as in
    docs/design.md section 3 and the authors' released loss; a chance-level loss is 2 ln B.
    """
    logits = logit_scale * scores
    targets = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)


def mug_contrastive_loss(frames: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                         text_pooled: torch.Tensor, config: MugConfig | None = None,
                         rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Global-batch contrastive loss.

    Args:
        frames: (B, T, P) this rank's frame embeddings.
        text_tokens: (B, K, P); text_mask: (B, K) bool; text_pooled: (B, P).
    Returns:
        scalar loss, identical on every rank.
    """
    config = config or MugConfig()
    scores = score_matrix(gather(text_tokens, rank, world_size), gather(text_mask, rank, world_size),
                          gather(text_pooled, rank, world_size), gather(frames, rank, world_size),
                          config=config)
    return symmetric_infonce(scores, config.tau)
