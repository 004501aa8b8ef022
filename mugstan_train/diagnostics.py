"""Cheap training diagnostics of the temporal branch: is it learning anything about order?

Two kinds of figures, logged every ``--diagnostics-interval`` steps into
``metrics.jsonl`` (``"type": "diagnostics"``) and TensorBoard:

* **branch norms**: for each STAN layer j, the norm of the cross-frame module's
  zero-initialised output linear (``cross_frame.j.out``) and of its gradient, the
  gradient norm of the temporal attention's in-projection, and the temporal
  embedding's norm and gradient norm. A branch whose output linear stays at zero,
  or whose attention gets no gradient, cannot learn motion.
* **order sensitivity**: on a fixed batch of training clips, the mean over clips of
  |score(clip, its caption) - score(the clip's frames reversed, the same caption)|.
  A video embedding that ignores frame order gives exactly 0 (up to fp32 summation
  order, about 1e-7); the figure must rise from 0 for time to be learnt.
"""

from __future__ import annotations

import torch

from mugstan_chat.model.dual_encoder import MugStan


def _norm(tensor: torch.Tensor | None) -> float:
    return 0.0 if tensor is None else float(tensor.detach().float().norm())


def branch_norms(model: MugStan) -> dict[str, float]:
    """Norms of the temporal branch's parameters and of their current gradients (after backward)."""
    stan = model.stan
    if stan is None:
        return {}
    out = {"temporal_embedding": _norm(stan.temporal_embedding),
           "temporal_embedding_grad": _norm(stan.temporal_embedding.grad)}
    for j, module in enumerate(stan.cross_frame):
        out[f"cross_frame{j}_out"] = _norm(module.out.weight)
        out[f"cross_frame{j}_out_grad"] = _norm(module.out.weight.grad)
        out[f"cross_frame{j}_attn_grad"] = _norm(module.attn.in_proj_weight.grad)
    return out


@torch.no_grad()
def order_sensitivity(model: MugStan, clips: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> float:
    """Mean |score(clip, caption) - score(reversed clip, caption)| over a fixed batch.

    Args:
        clips: (B, T, 3, H, W) normalised clips; input_ids / attention_mask: (B, K) their captions.
    """
    was_training = model.training
    model.eval()
    try:
        text = model.encode_text(input_ids, attention_mask)
        forward = model.score(text, model.encode_video(clips)).diagonal()
        backward = model.score(text, model.encode_video(clips.flip(1))).diagonal()
    finally:
        model.train(was_training)
    return float((forward - backward).abs().mean())


class TrainingDiagnostics:
    """Holds the fixed probe batch; :meth:`measure` returns one diagnostics record."""

    def __init__(self, model: MugStan, clips: torch.Tensor, captions: list[str], device: torch.device):
        tokens = model.build_tokenizer()(captions)
        self.clips = clips.to(device)
        self.input_ids = tokens.input_ids.to(device)
        self.attention_mask = tokens.attention_mask.to(device)

    def measure(self, model: MugStan) -> dict[str, float]:
        return {"order_sensitivity": order_sensitivity(model, self.clips, self.input_ids, self.attention_mask),
                **branch_norms(model)}
