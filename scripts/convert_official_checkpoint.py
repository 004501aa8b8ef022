"""Convert a Mug-STAN checkpoint saved by the authors' mmaction2 code into our format.

Usage::

    python scripts/convert_official_checkpoint.py mugstan_webvid_b32.pth converted/mugstan-b32
    python scripts/convert_official_checkpoint.py ckpt.pth out/ --vision-layers 12 --stan-layers 4

The input is read with ``torch.load(weights_only=True)``: tensors and plain
containers; an mmengine checkpoint's bookkeeping (message hub, numpy arrays) is
read as inert stand-ins, and anything else that needs code to unpickle is refused.
The output is a ``MugStan.save_pretrained`` directory (config.json +
model.safetensors) on a transformers CLIP backbone, fused at the last layer and
scored with the Mug mode the authors trained with (``frame-token-simple`` for every
released Mug-STAN config; ``mean`` for plain STAN/CLIP configs without a Mug head).

The key layout, and where the layer counts come from (flags, then the checkpoint's
own mmengine config, then the released sizes by width, and only then the keys, with
a warning), are in ``mugstan_chat/official.py``. A checkpoint that does not fill
that architecture is refused with the missing tensors named. See docs/training.md,
"Converting the authors' checkpoints".
"""

from __future__ import annotations

import argparse
import logging
import sys

from mugstan_chat.mug import MODES


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="the authors' .pth / .pt checkpoint")
    parser.add_argument("output", help="output directory (MugStan.save_pretrained format)")
    parser.add_argument("--vision-layers", type=_positive, default=None,
                        help="vision tower layers (default: the checkpoint's config, else 12 for width 768 and "
                             "24 for 1024)")
    parser.add_argument("--stan-layers", type=_positive, default=None,
                        help="STAN depth K (default: the checkpoint's config, else 4 for released widths)")
    parser.add_argument("--text-layers", type=_positive, default=None,
                        help="text tower layers (default: the checkpoint's config, else 12 for released widths)")
    parser.add_argument("--vision-heads", type=int, default=None, help="default width / 64 (CLIP)")
    parser.add_argument("--text-heads", type=int, default=None, help="default width / 64 (CLIP)")
    parser.add_argument("--mug-mode", choices=MODES, default=None,
                        help="default: the checkpoint config's Mug head (frame-token-simple when it has none)")
    parser.add_argument("--fuse-layer", type=int, default=-1, help="STAN's fuse layer (released code: the last)")
    parser.add_argument("--text-length", type=int, default=64, help="caption tokens (32 for MSR-VTT evaluation)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    from mugstan_chat.official import ConversionError, convert, load_official_checkpoint

    try:
        model, arch = convert(load_official_checkpoint(args.input), vision_layers=args.vision_layers,
                              stan_layers=args.stan_layers, text_layers=args.text_layers, mug_mode=args.mug_mode,
                              vision_heads=args.vision_heads, text_heads=args.text_heads,
                              fuse_layer=args.fuse_layer, text_length=args.text_length)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model.save_pretrained(args.output)
    print(f"converted {args.input} -> {args.output} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; {'; '.join(arch.notes)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
