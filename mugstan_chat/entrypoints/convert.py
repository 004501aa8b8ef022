"""``mugstan-chat convert-official IN.pth OUT_DIR``: the authors' released Mug-STAN checkpoint in our format.

The input is read with ``torch.load(weights_only=True)``: tensors and plain containers; an
mmengine checkpoint's bookkeeping (message hub, numpy arrays) is read as inert stand-ins, and
anything else that needs code to unpickle is refused. The output is a ``MugStan.save_pretrained``
folder (config.json + model.safetensors) on a transformers CLIP backbone, fused at the last layer
and scored with the Mug mode the authors trained with (``frame-token-simple`` for every released
Mug-STAN config; ``mean`` for plain STAN/CLIP configs without a Mug head). It is written whole
or not at all, and an existing folder is replaced only with ``--overwrite``.

The key layout, and where the layer counts come from (flags, then the checkpoint's own mmengine
config, then the released sizes by width, and only then the keys, with a warning), are in
:mod:`mugstan_chat.model.authors_checkpoint`; a checkpoint that does not fill that architecture is
refused with the missing tensors named (docs/training.md, "Converting the authors' checkpoints").
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..options import MUG_MODES
from ..output_dir import atomic_output_dir, output_dir_problem
from .values import non_negative_int

PROG = "mugstan-chat convert-official"


def add_convert_command(commands) -> None:
    """Adds ``convert-official`` to the ``mugstan-chat`` subcommands."""
    parser = commands.add_parser("convert-official", help="convert the authors' released checkpoint (docs/training.md)",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("input", help="the authors' .pth / .pt checkpoint")
    parser.add_argument("output", help="output folder (MugStan.save_pretrained format; refused if not empty, see "
                                       "--overwrite)")
    parser.add_argument("--vision-layers", type=non_negative_int, default=None,
                        help="vision tower layers (default: the checkpoint's config, else 12 for width 768 and "
                             "24 for 1024)")
    parser.add_argument("--stan-layers", type=non_negative_int, default=None,
                        help="STAN depth K (default: the checkpoint's config, else 4 for released widths)")
    parser.add_argument("--text-layers", type=non_negative_int, default=None,
                        help="text tower layers (default: the checkpoint's config, else 12 for released widths)")
    parser.add_argument("--vision-heads", type=non_negative_int, default=None, help="default width / 64 (CLIP)")
    parser.add_argument("--text-heads", type=non_negative_int, default=None, help="default width / 64 (CLIP)")
    parser.add_argument("--mug-mode", choices=MUG_MODES, default=None,
                        help="default: the checkpoint config's Mug head (frame-token-simple when it has none)")
    parser.add_argument("--fuse-layer", type=int, default=-1, help="STAN's fuse layer (released code: the last)")
    parser.add_argument("--text-length", type=non_negative_int, default=64,
                        help="caption tokens (32 for MSR-VTT evaluation)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it is not empty")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    problem = output_dir_problem(args.output, args.overwrite, "OUTPUT")
    if problem is None and not Path(args.input).is_file():
        problem = f"INPUT {args.input} is not a file"
    if problem:  # a usage error, before the checkpoint is read
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    logging.getLogger("mugstan_chat.model.authors_checkpoint").setLevel(logging.WARNING)
    from ..model.authors_checkpoint import ConversionError, convert, load_official_checkpoint

    try:
        model, arch = convert(load_official_checkpoint(args.input), vision_layers=args.vision_layers,
                              stan_layers=args.stan_layers, text_layers=args.text_layers, mug_mode=args.mug_mode,
                              vision_heads=args.vision_heads, text_heads=args.text_heads,
                              fuse_layer=args.fuse_layer, text_length=args.text_length)
    except ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    with atomic_output_dir(args.output) as tmp:
        model.save_pretrained(tmp)
    print(f"converted {args.input} -> {args.output} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; {'; '.join(arch.notes)})")
    return 0
