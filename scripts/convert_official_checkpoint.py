"""Convert a Mug-STAN state dict saved by the authors' mmaction2-based code into our checkpoint format.

Usage::

    python scripts/convert_official_checkpoint.py mugstan_webvid_l14.pth converted/ [--vision-heads 16 --text-heads 12]

The input is read with ``torch.load(weights_only=True)``: tensors and plain
containers only; a file that needs code to unpickle is refused. The output is a
``MugStan.save_pretrained`` directory (config.json + model.safetensors) with an
hf-family backbone whose architecture is inferred from the tensor shapes (head
counts cannot be: they default to width / 64, CLIP's head size).

Key mapping (source prefix ``backbone.`` = the vision tower; an enclosing
``state_dict`` / ``model`` / ``module.`` is stripped):

====================================================  ==============================================
source                                                ours
====================================================  ==============================================
backbone.embeddings.*                                 vision.vision_model.embeddings.*
backbone.pre_layrnorm.* / post_layernorm.*            vision.vision_model.pre_layrnorm.* / post_layernorm.*
backbone.layers.{i}.*   (CLIPEncoderLayer names)      vision.vision_model.encoder.layers.{i}.*
backbone.visual_projection.weight                     vision.projection.weight
backbone.STAN_time_embed.weight                       stan.temporal_embedding
backbone.STAN_S_layers.{j}.* (CLIPEncoderLayer)       stan.intra_frame.{j}.layer.*
backbone.STAN_T_layers.{j}.layernorm.*                stan.cross_frame.{j}.norm.*
backbone.STAN_T_layers.{j}.attn.in_proj_{weight,bias} stan.cross_frame.{j}.attn.in_proj_*
  or .attn.{q,k,v}_proj.{weight,bias}                   (q, k, v concatenated in that order)
backbone.STAN_T_layers.{j}.attn.out_proj.*            stan.cross_frame.{j}.attn.out_proj.*
backbone.STAN_T_layers.{j}.temporal_fc.*              stan.cross_frame.{j}.out.*
text_backbone.text_model.*                            text.text_model.*
text_backbone.text_projection.weight                  text.projection.weight
====================================================  ==============================================

``position_ids`` buffers and ``logit_scale`` are dropped; any other key left
unmapped is an error, and the converted tensors must fill our model exactly.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from pathlib import Path

import torch

_IGNORED = re.compile(r"(^|\.)(position_ids|logit_scale)$")
_DIRECT = [
    (r"^backbone\.embeddings\.", "vision.vision_model.embeddings."),
    (r"^backbone\.pre_layrnorm\.", "vision.vision_model.pre_layrnorm."),
    (r"^backbone\.post_layernorm\.", "vision.vision_model.post_layernorm."),
    (r"^backbone\.layers\.(\d+)\.", r"vision.vision_model.encoder.layers.\1."),
    (r"^backbone\.visual_projection\.weight$", "vision.projection.weight"),
    (r"^backbone\.STAN_time_embed\.weight$", "stan.temporal_embedding"),
    (r"^backbone\.STAN_S_layers\.(\d+)\.", r"stan.intra_frame.\1.layer."),
    (r"^backbone\.STAN_T_layers\.(\d+)\.layernorm\.", r"stan.cross_frame.\1.norm."),
    (r"^backbone\.STAN_T_layers\.(\d+)\.attn\.in_proj_(weight|bias)$", r"stan.cross_frame.\1.attn.in_proj_\2"),
    (r"^backbone\.STAN_T_layers\.(\d+)\.attn\.out_proj\.", r"stan.cross_frame.\1.attn.out_proj."),
    (r"^backbone\.STAN_T_layers\.(\d+)\.temporal_fc\.", r"stan.cross_frame.\1.out."),
    (r"^text_backbone\.text_model\.", "text.text_model."),
    (r"^text_backbone\.text_projection\.weight$", "text.projection.weight"),
]
_QKV = re.compile(r"^backbone\.STAN_T_layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")


class ConversionError(Exception):
    """The input is not a state dict this converter understands."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint without running pickled code and returns its flat tensor dict."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} needs code to be unpickled and is refused (weights_only=True): {str(error).splitlines()[0]}. "
            f"Re-save only its tensors, e.g. torch.save(checkpoint['state_dict'], 'weights.pth'), from a trusted "
            f"environment.") from error
    for key in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(f"{path} does not hold a flat dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in data.items()}


def map_keys(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source names -> our names. Raises when a tensor is left unmapped."""
    out, qkv, unmapped = {}, {}, []
    for key, value in source.items():
        if _IGNORED.search(key):
            continue
        match = _QKV.match(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        for pattern, replacement in _DIRECT:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            unmapped.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"STAN_T_layers.{layer}.attn: has {sorted(parts)} {kind}s, needs q, k and v")
        out[f"stan.cross_frame.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensors have no mapping, e.g. {unmapped[:8]}")
    return out


def _count(state: dict, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def infer_config(state: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
                 fuse_layer: int = -1, text_length: int = 64):
    """A MugStanConfig whose hf CLIP backbone and STAN match the converted tensors' shapes."""
    from mugstan_chat.backbone import BackboneConfig
    from mugstan_chat.model import MugStanConfig
    from mugstan_chat.stan import StanConfig

    v = "vision.vision_model."
    width = state[f"{v}embeddings.class_embedding"].shape[0]
    patch = state[f"{v}embeddings.patch_embedding.weight"].shape[-1]
    positions = state[f"{v}embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(f"{positions - 1} patch positions do not form a square grid")
    t = "text.text_model."
    token = state[f"{t}embeddings.token_embedding.weight"]
    text_width = token.shape[1]
    vision_config = {
        "hidden_size": width, "intermediate_size": state[f"{v}encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": _count(state, rf"{re.escape(v)}encoder\.layers\.(\d+)\."),
        "num_attention_heads": vision_heads or max(1, width // 64), "image_size": grid * patch, "patch_size": patch,
    }
    text_config = {
        "hidden_size": text_width, "intermediate_size": state[f"{t}encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": _count(state, rf"{re.escape(t)}encoder\.layers\.(\d+)\."),
        "num_attention_heads": text_heads or max(1, text_width // 64), "vocab_size": token.shape[0],
        "max_position_embeddings": state[f"{t}embeddings.position_embedding.weight"].shape[0],
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }
    backbone = BackboneConfig(family="hf", model_config={
        "vision_config": vision_config, "text_config": text_config,
        "projection_dim": state["vision.projection.weight"].shape[0]})
    stan = None
    if "stan.temporal_embedding" in state:
        stan = StanConfig(num_layers=_count(state, r"stan\.cross_frame\.(\d+)\."), fuse_layer=fuse_layer,
                          max_frames=state["stan.temporal_embedding"].shape[0])
    return MugStanConfig(backbone=backbone, stan=stan, context_length=text_length)


def convert(source: dict[str, torch.Tensor], **config_kwargs):
    """Source state dict -> a loaded MugStan (every tensor mapped, every parameter filled, shapes checked)."""
    from mugstan_chat.model import MugStan

    mapped = map_keys(source)
    model = MugStan(infer_config(mapped, **config_kwargs))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    wrong = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in mapped and mapped[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise ConversionError(f"converted weights do not fit: missing {missing[:5]}, extra {extra[:5]}, "
                              f"shape {wrong[:5]}")
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="the authors' .pth / .pt checkpoint")
    parser.add_argument("output", help="output directory (MugStan.save_pretrained format)")
    parser.add_argument("--vision-heads", type=int, default=None, help="default width / 64 (CLIP)")
    parser.add_argument("--text-heads", type=int, default=None, help="default width / 64 (CLIP)")
    parser.add_argument("--fuse-layer", type=int, default=-1, help="STAN's fuse layer (released code: the last)")
    parser.add_argument("--text-length", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        model = convert(load_state_dict(args.input), vision_heads=args.vision_heads, text_heads=args.text_heads,
                        fuse_layer=args.fuse_layer, text_length=args.text_length)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model.save_pretrained(args.output)
    print(f"converted {args.input} -> {args.output} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
