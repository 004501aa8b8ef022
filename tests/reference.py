"""Slow, loop-based implementations of docs/design.md sections 1-2, written from the text.

They share no code with the fast implementation beyond reading its weights and
the backbone's own layers: every sequence is built token by token, temporal
attention is computed per head from the raw projection matrices, and Mug builds
the frame-specific text and token-specific video vectors explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def manual_attention(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """Multi-head self-attention over the rows of x (S, D), computed head by head."""
    D = x.shape[-1]
    H = attn.num_heads
    hd = D // H
    wq, wk, wv = attn.in_proj_weight.split(D)
    bq, bk, bv = attn.in_proj_bias.split(D)
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    heads = []
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
        heads.append(torch.softmax(scores, dim=-1) @ v[:, sl])
    return torch.cat(heads, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def cross_frame_reference(cls, patches, module):
    """cls (D,), patches [t][l] -> new patches; for each position l, its T tokens attend over time."""
    T, L = len(patches), len(patches[0])
    out = [[None] * L for _ in range(T)]
    for l in range(L):
        seq = torch.stack([patches[t][l] for t in range(T)])  # (T, D)
        attended = manual_attention(F.layer_norm(seq, seq.shape[-1:], module.norm.weight, module.norm.bias,
                                                 module.norm.eps), module.attn)
        delta = attended @ module.out.weight.T + module.out.bias
        for t in range(T):
            out[t][l] = patches[t][l] + delta[t]
    return cls, out


def intra_frame_reference(cls, patches, module, attention_branch, mlp_branch):
    """Replicate the video [CLS] into each frame, attend within the frame, average the [CLS] outputs."""
    T, L = len(patches), len(patches[0])
    cls_outputs = []
    new_patches = [[None] * L for _ in range(T)]
    for t in range(T):
        seq = torch.stack([cls] + [patches[t][l] for l in range(L)])[None]  # (1, L+1, D)
        attended = attention_branch(module.layer, seq)[0]
        cls_outputs.append(attended[0])
        for l in range(L):
            new_patches[t][l] = patches[t][l] + attended[1 + l]
    cls = cls + sum(cls_outputs) / T
    new_cls = cls + mlp_branch(module.layer, cls[None, None])[0, 0]
    for t in range(T):
        for l in range(L):
            p = new_patches[t][l]
            new_patches[t][l] = p + mlp_branch(module.layer, p[None, None])[0, 0]
    return new_cls, new_patches


def stan_encode_reference(backbone, stan, clip: torch.Tensor) -> torch.Tensor:
    """One clip (T, 3, H, W) -> (T, L+1, D) tokens after the last backbone layer, STAN fused at f."""
    T = clip.shape[0]
    frames = [backbone.embed(clip[t:t + 1])[0] for t in range(T)]  # T x (L+1, D)
    L = frames[0].shape[0] - 1
    pos, cls_emb = backbone.position_embedding, backbone.class_embedding
    first = stan.fuse_layer - stan.config.num_layers + 1
    cls = patches = None
    for index in range(backbone.num_layers):
        frames = [backbone.run_layer(index, x[None])[0] for x in frames]
        if not first <= index <= stan.fuse_layer:
            continue
        j = index - first
        mean_cls = sum(x[0] for x in frames) / T
        if j == 0:
            cls = 0.5 * (mean_cls + cls_emb + pos[0])
            patches = [[frames[t][l] + pos[l] + stan.temporal_embedding[t]
                        for l in range(1, L + 1)] for t in range(T)]
        else:
            cls = cls + mean_cls
            patches = [[patches[t][l - 1] + frames[t][l] for l in range(1, L + 1)] for t in range(T)]
        cls, patches = cross_frame_reference(cls, patches, stan.cross_frame[j])
        cls, patches = intra_frame_reference(cls, patches, stan.intra_frame[j], backbone.attention_branch,
                                             backbone.mlp_branch)
        if index == stan.fuse_layer:
            frames = [torch.stack([frames[t][0] + cls] + [frames[t][l] + patches[t][l - 1] for l in range(1, L + 1)])
                      for t in range(T)]
    return torch.stack(frames)


# --------------------------------------------------------------------------- Mug


def _soft(logits: torch.Tensor, topk: int | None) -> torch.Tensor:
    if topk is None:
        return torch.softmax(logits, dim=0)
    k = min(topk, logits.numel())
    weights = torch.zeros_like(logits)
    weights[logits.topk(k).indices] = 1.0 / k
    return weights


def mug_score_reference(tokens, mask, pooled, frames, mode="frame-token", tau=100.0, topk=None):
    """Score of one (text, video) pair following docs/design.md section 2 literally.

    tokens (K, P), mask (K,) bool, pooled (P,), frames (T, P).
    """
    v = F.normalize(frames, dim=-1)
    c = F.normalize(tokens[mask], dim=-1)
    if mode in ("frame-text", "mean"):
        c = F.normalize(pooled, dim=-1)[None]
    if mode in ("video-token", "mean"):  # the mean of the raw frames, then normalised (released order)
        v = F.normalize(sum(frames[i] for i in range(frames.shape[0])) / frames.shape[0], dim=-1)[None]
    if mode == "mean":
        return (c[0] * v[0]).sum()
    T, K = v.shape[0], c.shape[0]
    if mode == "frame-token-simple":
        # f_i = c~_i . v_i and t_j = c_j . v~_j with the same weightings, then the two pooled similarities averaged
        f, t = [], []
        for i in range(T):
            s = _soft(torch.stack([tau * (c[j] @ v[i]) for j in range(K)]), topk)
            f.append(sum(s[j] * (c[j] @ v[i]) for j in range(K)))
        for j in range(K):
            s = _soft(torch.stack([tau * (c[j] @ v[i]) for i in range(T)]), topk)
            t.append(sum(s[i] * (c[j] @ v[i]) for i in range(T)))
        f, t = torch.stack(f), torch.stack(t)
        return 0.5 * ((_soft(tau * t, topk) * t).sum() + (_soft(tau * f, topk) * f).sum())
    # text guided by video -> video embedding
    frame_text = []
    for i in range(T):
        s = _soft(torch.stack([tau * (c[j] @ v[i]) for j in range(K)]), topk)
        frame_text.append(sum(s[j] * c[j] for j in range(K)))
    w = _soft(torch.stack([tau * (frame_text[i] @ v[i]) for i in range(T)]), topk)
    video = sum(w[i] * v[i] for i in range(T))
    # video guided by text -> text embedding
    token_video = []
    for j in range(K):
        s = _soft(torch.stack([tau * (c[j] @ v[i]) for i in range(T)]), topk)
        token_video.append(sum(s[i] * v[i] for i in range(T)))
    u = _soft(torch.stack([tau * (c[j] @ token_video[j]) for j in range(K)]), topk)
    text = sum(u[j] * c[j] for j in range(K))
    return text @ video
