"""Command-line arguments of the trainer, and the translation of a backbone argument into library configs.

Defaults are the paper's post-pretraining settings (docs/design.md section 3) for
CLIP-L/14 except the batch size, which is per device (global 1024 = 8 GPUs x 128).
"""

from __future__ import annotations

import argparse

from mugstan_chat.model.backbone import BackboneConfig, tiny_backbone_config
from mugstan_chat.model.dual_encoder import MugStanConfig
from mugstan_chat.model.mug import MODES, MugConfig
from mugstan_chat.model.stan import StanConfig

from mugstan_chat.entrypoints.values import positive_int

from mugstan_train.data import PRESETS, Columns, DataError, read_annotations
from mugstan_train.optim import OPTIMIZERS
from mugstan_train.recognition_data import ClassIndex, labelled_records, read_class_names, recognition_columns
from mugstan_train.shards import MAX_CONSECUTIVE_SKIPS, count_samples, expand_shards, is_shard_spec


def backbone_from_spec(spec: str, seed: int = 0) -> BackboneConfig:
    """``tiny`` | ``tiny-open_clip`` | ``open_clip:NAME[:PRETRAINED]`` | a transformers CLIP name or directory."""
    if spec == "tiny":
        return tiny_backbone_config("hf", seed=seed)
    if spec == "tiny-open_clip":
        return tiny_backbone_config("open_clip", seed=seed)
    if spec.startswith("open_clip:"):
        _, name, *tag = spec.split(":", 2)
        return BackboneConfig(family="open_clip", name=name, pretrained=tag[0] if tag else None)
    return BackboneConfig(family="hf", name=spec)


def model_config(backbone: str, *, no_stan: bool = False, stan_layers: int = 4, fuse_layer: int | None = None,
                 mug_mode: str | None = None, mug_topk: int | None = None, drop_path: float = 0.1,
                 freeze_backbone: bool = False, text_length: int = 64, seed: int = 0) -> MugStanConfig:
    """The library config for a run. ``fuse_layer=None``: -2 (LLaVA's feature layer) when frozen, else -1."""
    backbone_config = backbone_from_spec(backbone, seed)
    stan = None
    if not no_stan:
        fuse = fuse_layer if fuse_layer is not None else (-2 if freeze_backbone else -1)
        stan = StanConfig(num_layers=stan_layers, fuse_layer=fuse, drop_path=drop_path)
    mode = mug_mode or ("mean" if no_stan else "frame-token")
    tokenizer = backbone_config.name if backbone_config.family == "hf" and backbone_config.name else None
    return MugStanConfig(backbone=backbone_config, stan=stan, mug=MugConfig(mode=mode, topk=mug_topk),
                         freeze_backbone=freeze_backbone, context_length=text_length, tokenizer=tokenizer)


def add_data_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Annotation layout options (shared with evaluation); ``prefix`` e.g. "eval-"."""
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}preset", dest=f"{dest}preset", default="generic", choices=sorted(PRESETS),
                        help="annotation column layout (webvid: {page_dir}/{videoid}.mp4 + name; recognition: "
                             "k400 path,label and ssv2 SSv2's JSON)")
    parser.add_argument(f"--{prefix}video-column", dest=f"{dest}video_column", default=None)
    parser.add_argument(f"--{prefix}caption-column", dest=f"{dest}caption_column", default=None)
    parser.add_argument(f"--{prefix}video-template", dest=f"{dest}video_template", default=None,
                        help="video path built from columns, e.g. '{page_dir}/{videoid}.mp4'")
    parser.add_argument(f"--{prefix}label-column", dest=f"{dest}label_column", default=None,
                        help="recognition: the column of the class name or 0-based index (default: the preset's, "
                             "else label)")


def columns_from_args(args: argparse.Namespace, prefix: str = "") -> Columns:
    get = lambda name: getattr(args, f"{prefix}{name}")  # noqa: E731
    return Columns.preset(get("preset"), video_column=get("video_column"), caption_column=get("caption_column"),
                          video_template=get("video_template"), label_column=get("label_column"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Mug-STAN video-text post-pretraining on a CLIP backbone.")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="openai/clip-vit-large-patch14",
                   help="transformers CLIP name/dir, open_clip:NAME[:PRETRAINED], tiny or tiny-open_clip")
    m.add_argument("--no-stan", action="store_true", help="plain-CLIP baseline (no temporal branch; Mug mode mean)")
    m.add_argument("--stan-layers", type=int, default=4, help="K, STAN layers")
    m.add_argument("--fuse-layer", type=int, default=None, help="backbone layer STAN fuses into (default -1; "
                   "-2 with --freeze-backbone, LLaVA's feature layer)")
    m.add_argument("--mug-mode", choices=MODES, default=None, help="default frame-token (mean with --no-stan)")
    m.add_argument("--mug-topk", type=int, default=None)
    m.add_argument("--drop-path", type=float, default=0.1, help="STAN drop-path rate of the last layer")
    m.add_argument("--freeze-backbone", action="store_true", help="train STAN only (LLaVA-compatible)")
    m.add_argument("--grad-checkpointing", action="store_true")
    m.add_argument("--init-from", default=None, metavar="DIR",
                   help="start the vision and text towers from a saved MugStan model (e.g. an image-text warm-up "
                        "run's final/); STAN is then built fresh from the loaded tower, so its intra-frame modules "
                        "copy the loaded layers. Any STAN in DIR is ignored (use --resume to continue a run)")
    m.add_argument("--init-stan", action="store_true",
                   help="with --init-from: load DIR's STAN branch too (same --stan-layers), to go on from a "
                        "video-text run with another Mug head; the optimiser and schedule start afresh")
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True,
                   help="annotations (.csv, .tsv, .json or .jsonl), or tar shards in video2dataset's layout: "
                        "brace-expanded paths or URLs ('pipe:' too), several lists joined by '::'")
    d.add_argument("--video-root", default=".", help="folder the annotation video paths are relative to")
    add_data_arguments(d)
    d.add_argument("--train-data-upsampling-factors", default=None, metavar="F1::F2",
                   help="shards: one factor per '::'-separated list; each shard is drawn in proportion to its "
                        "list's factor (needs --dataset-resampled)")
    d.add_argument("--train-num-samples", type=int, default=None,
                   help="shards: samples per epoch (default: the sum of sizes.json, or of 'successes' in "
                        "video2dataset's *_stats.json, beside the shards)")
    d.add_argument("--dataset-resampled", action="store_true",
                   help="shards: every rank and worker draws shards with replacement (else a seeded per-epoch "
                        "shuffle split by node, then by worker)")
    d.add_argument("--caption-key", default=None, metavar="FIELD",
                   help="shards: read the caption from this field of KEY.json instead of KEY.txt")
    d.add_argument("--group-column", default=None, metavar="COLUMN",
                   help="hard-negative batching: annotation rows sharing a value of COLUMN are kept next to each "
                        "other in the epoch order, so they land in the same global batch (e.g. a clip and its "
                        "time-reversed partner, --group-column pair); see mugstan_train.data.GlobalBatchSampler")
    d.add_argument("--frames", type=int, default=12, help="frames per clip (sparse sampling)")
    d.add_argument("--image-size", type=int, default=None, help="input side (default: the backbone's)")
    d.add_argument("--text-length", type=int, default=64)
    d.add_argument("--workers", type=int, default=4, help="data-loading processes per rank")
    d.add_argument("--max-decode-failure-rate", type=float, default=0.05)
    d.add_argument("--failure-window", type=int, default=1000, help="decodes per failure-rate window")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=128, help="clips per device (global = x world size)")
    o.add_argument("--epochs", type=int, default=3)
    o.add_argument("--max-steps", type=int, default=None, help="total steps (overrides --epochs)")
    o.add_argument("--lr-backbone", type=float, default=4e-6)
    o.add_argument("--lr-stan", type=float, default=4e-5)
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw (the paper's); sgd: plain SGD, linear in the gradient, for equivalence checks")
    o.add_argument("--weight-decay", type=float, default=0.05, help="0.05 (released configs); paper: 0.001")
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the total steps")
    o.add_argument("--grad-clip", type=float, default=5.0, help="max gradient norm (0: off)")
    o.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    o.add_argument("--max-nonfinite", type=int, default=10, help="abort after this many non-finite steps in a row")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", required=True)
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--save-interval", "--save-every-steps", dest="save_interval", type=int, default=1000, help="steps between training checkpoints, also written at epoch ends and the last step "
                        "(0: none, only the final export, and the one --stop-at-step needs)")
    r.add_argument("--keep-checkpoints", type=int, default=3)
    r.add_argument("--resume", default=None,
                   help="latest or auto (the newest complete checkpoint; none: start fresh), or a checkpoint "
                        "directory; use auto under torchrun --max-restarts, so a restarted group continues")
    r.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step without changing the schedule (time-limited jobs)")
    r.add_argument("--log-interval", type=int, default=10)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--diagnostics-interval", type=int, default=100,
                   help="steps between temporal-branch diagnostics (order sensitivity on a fixed batch of "
                        "--diagnostics-clips training clips, branch norms and gradients; 0: off)")
    r.add_argument("--diagnostics-clips", type=int, default=8)
    r.add_argument("--tensorboard", action="store_true")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-data", default=None, help="retrieval annotations, or tar shards (read into memory: "
                   "a test set, not a training set), evaluated during training")
    e.add_argument("--eval-video-root", default=None, help="default: --video-root")
    add_data_arguments(e, "eval-")
    e.add_argument("--eval-interval", type=int, default=0, help="steps between evaluations (0: at the end)")
    e.add_argument("--eval-batch-size", type=int, default=32)
    add_fault_arguments(p)
    add_recognition_arguments(p)
    return p


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """How the run bounds and reports its faults (docs/training.md, "Errors")."""
    f = parser.add_argument_group("faults")
    f.add_argument("--max-consecutive-skips", type=positive_int, default=MAX_CONSECUTIVE_SKIPS, metavar="N",
                   help="shards: a reader that skips N samples or unreadable shards in a row without one usable "
                        "clip stops the run, naming the last (default %(default)s; with --dataset-resampled a "
                        "stream of broken shards would otherwise never end)")
    f.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its line")


TASKS = ("contrastive", "recognition")


def add_recognition_arguments(parser: argparse.ArgumentParser) -> None:
    """``--task`` and the class names of recognition fine-tuning (mugstan_train/recognition.py)."""
    r = parser.add_argument_group("recognition fine-tuning (docs/training.md)")
    r.add_argument("--task", choices=TASKS, default="contrastive",
                   help="contrastive: video-text post-pretraining on captions (Mug InfoNCE); recognition: fine-tune "
                        "the classifier made of the class names' text (cross-entropy over the Mug scores of each "
                        "clip against every class name; text tower frozen); --eval-data is then a labelled list "
                        "scored top-1/top-5 before training and after every epoch")
    r.add_argument("--class-names", default=None, metavar="FILE",
                   help="recognition: one class name per line, or JSON: a list, or name -> index "
                        "(SSv2's something-something-v2-labels.json)")


def check_recognition_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Recognition: the class names read and every label of the annotation files names a class (before any
    model loads); post-pretraining: the layouts have captions."""
    lists = [("--train-data", args.train_data, columns_from_args(args))]
    if args.eval_data:
        lists.append(("--eval-data", args.eval_data, columns_from_args(args, "eval_")))
    lists = [(flag, path, columns) for flag, path, columns in lists if not is_shard_spec(path)]
    if args.task != "recognition":
        if args.class_names:
            parser.error("--class-names is for --task recognition")
        for flag, path, columns in lists:
            if columns.caption_column is None:
                parser.error(f"{flag} {path}: its layout has no caption column (a recognition preset?); "
                             f"add --task recognition --class-names FILE, or give the caption column")
        return
    if not args.class_names:
        parser.error("--task recognition needs --class-names FILE")
    try:
        classes = ClassIndex(read_class_names(args.class_names))
        for flag, path, columns in lists:
            labelled_records(read_annotations(path, recognition_columns(columns)), classes, f"{flag} {path}")
    except DataError as error:
        parser.error(str(error))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.freeze_backbone and args.no_stan:
        parser.error("--freeze-backbone with --no-stan leaves nothing to train")
    if args.frames < 1 or args.batch_size < 1:
        parser.error("--frames and --batch-size must be positive")
    if args.init_stan and not args.init_from:
        parser.error("--init-stan needs --init-from DIR")
    if is_shard_spec(args.train_data):
        try:
            source = expand_shards(args.train_data, args.train_data_upsampling_factors)
            if args.train_num_samples is None:
                args.train_num_samples = count_samples(source)
        except DataError as error:
            parser.error(str(error))
        if args.train_num_samples is None:
            parser.error(f"--train-data {args.train_data}: give --train-num-samples (no sizes.json or "
                         f"*_stats.json beside every shard to count them)")
        if args.train_num_samples < 1:
            parser.error("--train-num-samples must be positive")
        if args.train_data_upsampling_factors and not args.dataset_resampled:
            parser.error("--train-data-upsampling-factors needs --dataset-resampled")
        if args.group_column:
            parser.error("--group-column needs an annotation file (shards are read in stream order)")
    elif args.train_num_samples is not None or args.dataset_resampled or args.train_data_upsampling_factors:
        parser.error("--train-num-samples, --dataset-resampled and --train-data-upsampling-factors are for shards; "
                     f"--train-data {args.train_data} is an annotation file")
    if args.eval_data and is_shard_spec(args.eval_data):
        try:
            expand_shards(args.eval_data, flag="--eval-data")
        except DataError as error:
            parser.error(str(error))
    check_recognition_arguments(parser, args)
    if args.init_from and args.freeze_backbone:
        # a frozen run exports the branch alone, to be reloaded on the tower named by --backbone, not DIR's
        parser.error("--init-from with --freeze-backbone is not supported: the exported branch would be "
                     "reloaded onto the --backbone tower instead of the one in --init-from")
    return args


def config_from_args(args: argparse.Namespace) -> MugStanConfig:
    config = model_config(args.backbone, no_stan=args.no_stan, stan_layers=args.stan_layers,
                          fuse_layer=args.fuse_layer, mug_mode=args.mug_mode, mug_topk=args.mug_topk,
                          drop_path=args.drop_path, freeze_backbone=args.freeze_backbone,
                          text_length=args.text_length, seed=args.seed)
    config.frames = args.frames  # saved with the model: evaluation samples the same number by default
    return config
