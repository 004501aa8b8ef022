"""Mug: parameter-free mutual-guided cross-modal alignment (docs/design.md section 2).

For a (text, video) pair with L2-normalised text tokens c_j and frames v_i, let
S[j, i] = c_j . v_i. Then

* video side: s_ij = softmax_j(tau S[j, i]);  frame weight w_i = softmax_i(tau sum_j s_ij S[j, i])
  (that sum is c~_i . v_i), and v^ = sum_i w_i v_i;
* text side:  s'_ij = softmax_i(tau S[j, i]); token weight u_j = softmax_j(tau sum_i s'_ij S[j, i])
  (that sum is c_j . v~_j), and c^ = sum_j u_j c_j;
* score = c^ . v^ = sum_ij u_j S[j, i] w_i.

So every pair's score needs only its K x T similarity matrix, and a B_text x B_video
score matrix is computed in blocks whose size bounds the peak memory.

Modes (paper Table VIII): "frame-token" (default), "frame-text" (text side = the
end-of-text token), "video-token" (video side = the mean of frames), "mean" (no Mug:
mean-pooled frames against the end-of-text token, the plain CLIP baseline), and
"frame-token-simple", the released implementation's default, which the released
weights were trained with: the same four softmax weightings, but the score averages
the two guided similarities instead of taking the dot product of the two guided
embeddings,

* t_j = sum_i s'_ij S[j, i] (= c_j . v~_j),  f_i = sum_j s_ij S[j, i] (= c~_i . v_i),
* score = (sum_j softmax_j(tau t)_j t_j + sum_i softmax_i(tau f)_i f_i) / 2.

Mean pooling ("video-token", "mean") averages the raw frame embeddings and then
L2-normalises the average, as the released code does.
``topk`` swaps every softmax for a hard selection of the k largest (uniform weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..options import MUG_MODES as MODES


@dataclass
class MugConfig:
    mode: str = "frame-token"  # one of MODES
    tau: float = 100.0  # fixed at CLIP's logit scale
    topk: int | None = None  # None: softmax; k: hard top-k selection instead
    chunk_size: int = 64  # texts and videos per block of the score matrix

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown Mug mode {self.mode!r}; expected one of {MODES}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_inputs(text_tokens: torch.Tensor, text_mask: torch.Tensor, text_pooled: torch.Tensor,
                   frames: torch.Tensor, frame_mask: torch.Tensor | None, mode: str):
    """Normalises and reduces the inputs to the token and frame sets a mode compares.

    Returns (tokens (Bt, K, P), token mask (Bt, K), frames (Bv, T, P), frame mask (Bv, T)).
    """
    if frame_mask is None:
        frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    frame_mask = frame_mask.bool()
    text_mask = text_mask.bool()
    if mode in ("frame-text", "mean"):
        text_tokens = text_pooled[:, None]
        text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
    if mode in ("video-token", "mean"):
        frames = mean_frames(frames, frame_mask)[:, None]
        frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    return F.normalize(text_tokens, dim=-1), text_mask, F.normalize(frames, dim=-1), frame_mask


def mean_frames(frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-CLIP video embedding, (B, T, P) -> (B, P): the mean of the raw (unnormalised) frames.

    The released code averages the projected frame embeddings before any normalisation
    (docs/design.md section 2); normalise the result to compare it by cosine.
    """
    if frame_mask is None:
        return frames.mean(dim=1)
    weights = frame_mask.to(frames.dtype)
    return (frames * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)


def _select(logits: torch.Tensor, mask: torch.Tensor, dim: int, topk: int | None) -> torch.Tensor:
    """Softmax over ``dim`` restricted to ``mask`` (or uniform weights on the top-k valid entries)."""
    # a finite fill keeps fully padded rows (and their gradients) free of NaN; their weights are zeroed
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    if topk is None:
        return torch.softmax(logits, dim=dim) * mask
    k = min(topk, logits.shape[dim])
    kth = logits.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    chosen = (logits >= kth) & mask
    weights = chosen.to(logits.dtype)
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(1)


def pair_scores(sim: torch.Tensor, token_mask: torch.Tensor, frame_mask: torch.Tensor,
                tau: float, topk: int | None = None, simple: bool = False) -> torch.Tensor:
    """Mug scores from similarity blocks.

    Args:
        sim: (..., K, T) token-frame cosine similarities S[j, i].
        token_mask: (..., K) bool; frame_mask: (..., T) bool (broadcastable to sim's batch dims).
        simple: the released "frame-token-simple" score instead of c^ . v^.
    Returns:
        (...) scores c^ . v^ (or, simple, the mean of the two guided similarities).
    """
    tmask = token_mask[..., :, None]  # (..., K, 1)
    fmask = frame_mask[..., None, :]  # (..., 1, T)
    valid = tmask & fmask
    over_tokens = _select(tau * sim, valid, dim=-2, topk=topk)  # s_ij, normalised over j
    frame_logits = (over_tokens * sim).sum(-2)  # (..., T): c~_i . v_i
    frame_weights = _select(tau * frame_logits, frame_mask.expand_as(frame_logits), dim=-1, topk=topk)
    over_frames = _select(tau * sim, valid, dim=-1, topk=topk)  # s'_ij, normalised over i
    token_logits = (over_frames * sim).sum(-1)  # (..., K): c_j . v~_j
    token_weights = _select(tau * token_logits, token_mask.expand_as(token_logits), dim=-1, topk=topk)
    if simple:
        text_side = (token_weights * token_logits.masked_fill(~token_mask, 0.0)).sum(-1)
        video_side = (frame_weights * frame_logits.masked_fill(~frame_mask, 0.0)).sum(-1)
        return 0.5 * (text_side + video_side)
    sim = sim.masked_fill(~valid, 0.0)
    return torch.einsum("...k,...kt,...t->...", token_weights, sim, frame_weights)


def score_matrix(text_tokens: torch.Tensor, text_mask: torch.Tensor, text_pooled: torch.Tensor,
                 frames: torch.Tensor, frame_mask: torch.Tensor | None = None,
                 config: MugConfig | None = None) -> torch.Tensor:
    """The B_text x B_video Mug score matrix, computed in blocks of ``config.chunk_size``.

    Args:
        text_tokens: (Bt, K, P) projected text tokens; text_mask: (Bt, K) bool, True = real token.
        text_pooled: (Bt, P) end-of-text embedding (used by "frame-text" and "mean").
        frames: (Bv, T, P) frame embeddings; frame_mask: optional (Bv, T) bool.
    Returns:
        (Bt, Bv) scores (cosine-scale; multiply by tau for logits).
    """
    config = config or MugConfig()
    tokens, tmask, frames, fmask = prepare_inputs(text_tokens, text_mask, text_pooled, frames, frame_mask,
                                                  config.mode)
    if config.mode == "mean":  # no Mug: one token against one frame is a plain cosine
        return tokens[:, 0] @ frames[:, 0].T
    chunk = config.chunk_size
    rows = []
    for t0 in range(0, tokens.shape[0], chunk):
        tok, tm = tokens[t0:t0 + chunk], tmask[t0:t0 + chunk]
        cols = []
        for v0 in range(0, frames.shape[0], chunk):
            frm, fm = frames[v0:v0 + chunk], fmask[v0:v0 + chunk]
            sim = torch.einsum("akp,btp->abkt", tok, frm)  # (ct, cv, K, T)
            cols.append(pair_scores(sim, tm[:, None], fm[None], config.tau, config.topk,
                                    simple=config.mode == "frame-token-simple"))
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)
