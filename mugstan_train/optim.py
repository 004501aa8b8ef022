"""AdamW with backbone / STAN learning rates, linear warm-up then cosine decay (docs/design.md section 3).

Plain SGD (no momentum) is offered beside AdamW for checks, not for training:
its update is linear in the gradient, so two runs whose gradients agree to fp32
rounding end with weights that agree to fp32 rounding. Adam divides by the root
of the second moment, which turns last-bit differences in a near-zero gradient
into full-size updates of either sign.

Parameter groups: the STAN branch (``stan.*``) trains at ``lr_stan`` (10x the
backbone in the paper), everything else at ``lr_backbone``. Norms, biases and
embeddings (class, position, token and STAN's temporal embedding) get no weight
decay. Frozen parameters are left out.
"""

from __future__ import annotations

import math

import torch
from torch import nn



def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight matrices decay; norms, biases and embedding tables do not (the patch projection does)."""
    if param.ndim < 2:  # biases, LayerNorm weights, class embedding (D,)
        return False
    parts = name.split(".")
    # position / token / temporal embedding tables: "position_embedding.weight", "positional_embedding",
    # "temporal_embedding"; the patch embedding is a convolution and decays like any weight
    return not any(p.endswith("embedding") and p != "patch_embedding" for p in parts)


def param_groups(model: nn.Module, lr_backbone: float, lr_stan: float, weight_decay: float) -> list[dict]:
    """Four groups (backbone/STAN x decay/no-decay); empty groups are dropped.

    Returns:
        dicts for ``torch.optim.AdamW`` with a ``name`` key for logging.
    """
    groups = {(branch, decay): [] for branch in ("backbone", "stan") for decay in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        branch = "stan" if name.startswith("stan.") else "backbone"
        groups[(branch, _decays(name, param))].append(param)
    out = []
    for (branch, decay), params in groups.items():
        if params:
            out.append({"name": f"{branch}{'' if decay else '_no_decay'}", "params": params,
                        "lr": lr_stan if branch == "stan" else lr_backbone,
                        "weight_decay": weight_decay if decay else 0.0})
    if not out:
        raise ValueError("the model has no trainable parameter (frozen backbone without a STAN branch?)")
    return out


OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(model: nn.Module, lr_backbone: float, lr_stan: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW with CLIP's usual betas/eps, or plain SGD (``kind="sgd"``, for equivalence checks)."""
    groups = param_groups(model, lr_backbone, lr_stan, weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=eps)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.0)
    raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear 1/warmup .. 1 over the warm-up, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
