"""Zero-shot evaluation: text-video retrieval and recognition from class names (docs/design.md sections 2-3).

Metric functions are pure functions of a score matrix. Ranks are pessimistic:
an item tied with the correct one counts as ranked above it, so a model that
cannot tell two clips apart gets no credit for either.

Usage::

    python training/evaluate.py --checkpoint OUT/final --data msrvtt_test.csv --preset msrvtt \\
        --video-root MSRVTT/videos --frames 12 --text-length 32
    python training/evaluate.py --backbone openai/clip-vit-large-patch14 ...   # plain-CLIP baseline
    python training/evaluate.py --checkpoint OUT/final --task recognition --data k400_val.csv \\
        --video-column path --label-column label --class-names k400_classes.txt --frames 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from mugstan_chat.model.backbone import TextFeatures
from mugstan_chat.entrypoints import run_reporting_errors
from mugstan_chat.entrypoints.progress import add_progress_flag, progress_bar
from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.model.mug import MODES

from mugstan_train.data import ClipSettings, DataError, EvalDataset, VideoRecord, build_eval_loader, read_annotations
from mugstan_train.recognition_data import ClassIndex, read_class_names, recognition_columns

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure metrics


def score_tolerance(projection_dim: int) -> float:
    """Scores closer than this are ties: what fp32 summation order alone can move a cosine-scale score.

    A Mug or cosine score sums about ``projection_dim`` products of unit-scale numbers; reordering
    the sum (e.g. the same frames in reverse order) moves it by at most about that many units of
    fp32 rounding (2^-24 each), times a small factor for the softmax weightings around it.
    """
    return 4 * projection_dim * 2.0 ** -24


def ranks_of_relevant(scores: torch.Tensor, relevant: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Rank (1 = best) of the best-scored relevant column of each row.

    Args:
        scores: (Nq, Ng) query-by-gallery scores.
        relevant: (Nq, Ng) bool, True where the gallery item is a correct answer (>= 1 per row).
        tolerance: irrelevant items within this of the best relevant score tie with it (see
            :func:`score_tolerance`).
    Returns:
        (Nq,) long: 1 + number of irrelevant items scoring at least as high (ties count against).
    """
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant gallery item")
    best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)  # (Nq, 1)
    return 1 + ((scores >= best - tolerance) & ~relevant).sum(dim=1)


def rank_metrics(ranks: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank of a rank vector."""
    ranks = ranks.double()
    out = {f"{prefix}R@{k}": float((ranks <= k).double().mean() * 100) for k in (1, 5, 10)}
    out[f"{prefix}MdR"] = float(ranks.median()) if ranks.numel() % 2 else float(ranks.quantile(0.5))
    out[f"{prefix}MnR"] = float(ranks.mean())
    return out


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor, tolerance: float = 0.0) -> dict[str, float]:
    """Text-to-video ("t2v_") and video-to-text ("v2t_") retrieval metrics.

    Args:
        scores: (Nt, Nv) text-by-video scores.
        relevant: (Nt, Nv) bool (e.g. one-hot of each caption's video).
        tolerance: scores within this of each other tie (ties count against).
    """
    return {**rank_metrics(ranks_of_relevant(scores, relevant, tolerance), "t2v_"),
            **rank_metrics(ranks_of_relevant(scores.T, relevant.T, tolerance), "v2t_")}


def relevance_by_caption(captions: list[str], video_captions: list[list[str]]) -> torch.Tensor:
    """(Nt, Nv) bool: a caption is a correct answer for every video that has exactly that caption."""
    return torch.tensor([[caption in own for own in video_captions] for caption in captions], dtype=torch.bool)


def pairwise_from_pairs(scores: torch.Tensor, captions: list[str], videos: list[VideoRecord],
                        tolerance: float) -> float | None:
    """Pairwise accuracy over videos sharing a ``pair`` value with a different caption (time-reversal pairs).

    For each such video, its own (first) caption must outscore its partner's; ties count 0.5.
    ``scores``: (Nt, Nv) over ``captions`` x ``videos``. None when the records have no pairs.
    """
    row = {caption: i for i, caption in enumerate(captions)}
    groups: dict[str, list[int]] = {}
    for j, record in enumerate(videos):
        if record.extra.get("pair") not in (None, ""):
            groups.setdefault(str(record.extra["pair"]), []).append(j)
    correct, wrong = [], []
    for members in groups.values():
        for j in members:
            for k in members:
                own, other = videos[j].captions[0], videos[k].captions[0]
                if k != j and own != other:
                    correct.append(scores[row[own], j])
                    wrong.append(scores[row[other], j])
    if not correct:
        return None
    return pairwise_accuracy(torch.stack(correct), torch.stack(wrong), tolerance)


def relevance_from_index(text_to_video: torch.Tensor, num_videos: int) -> torch.Tensor:
    """(Nt,) video index of each text -> (Nt, Nv) one-hot relevance."""
    return torch.nn.functional.one_hot(text_to_video.long(), num_videos).bool()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) of (C, Nv) class-by-video scores against (Nv,) labels."""
    ranks = ranks_of_relevant(scores.T, relevance_from_index(labels, scores.shape[0]))
    return {"top1": float((ranks <= 1).double().mean() * 100), "top5": float((ranks <= 5).double().mean() * 100)}


def pairwise_accuracy(correct: torch.Tensor, wrong: torch.Tensor, tolerance: float = 1e-6) -> float:
    """Fraction of items whose correct score beats the wrong one; ties (within ``tolerance``) count 0.5."""
    diff = correct - wrong
    return float(torch.where(diff.abs() <= tolerance, 0.5, (diff > 0).double()).mean())


# --------------------------------------------------------------------------- encoding


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def encode_texts(model: MugStan, captions: list[str], device: torch.device, batch_size: int = 256,
                 precision: str = "fp32") -> TextFeatures:
    """All captions -> TextFeatures (float32, on ``device``)."""
    tokenizer = model.build_tokenizer()
    parts = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[start:start + batch_size])
        with _autocast(device, precision):
            feats = model.encode_text(tokens.input_ids.to(device), tokens.attention_mask.to(device))
        parts.append(feats)
    return TextFeatures(tokens=torch.cat([p.tokens.float() for p in parts]),
                        mask=torch.cat([p.mask for p in parts]),
                        pooled=torch.cat([p.pooled.float() for p in parts]))


@torch.no_grad()
def encode_clips(model: MugStan, clips: torch.Tensor, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, P) float32 frame embeddings."""
    with _autocast(device, precision):
        return model.encode_video(clips.to(device)).float()


@torch.no_grad()
def encode_videos(model: MugStan, records: list[VideoRecord], root: str | Path, clip: ClipSettings,
                  device: torch.device, batch_size: int = 32, workers: int = 0,
                  precision: str = "fp32", progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every record's evaluation clip -> (frames (N, T, P), ok (N,) bool; False where decoding failed).

    ``progress``: a tqdm bar of the videos encoded, on stderr when it is a terminal (the CLI's default).
    """
    loader = build_eval_loader(EvalDataset(records, root, clip), batch_size, workers)
    frames, ok = [None] * len(records), torch.zeros(len(records), dtype=torch.bool)
    with progress_bar(progress, total=len(records), unit="video", desc="encode") as bar:
        for batch in loader:
            out = encode_clips(model, batch["video"], device, precision).cpu()
            for row, index in enumerate(batch["index"].tolist()):
                frames[index] = out[row]
            ok[batch["index"]] = batch["ok"]
            bar.update(len(batch["index"]))
    return torch.stack(frames), ok


def score(model: MugStan, texts: TextFeatures, frames: torch.Tensor) -> torch.Tensor:
    """(Nt, Nv) chunked Mug score matrix on the model's device."""
    device = texts.tokens.device
    with torch.no_grad():
        return model.score(texts, frames.to(device)).float().cpu()


# --------------------------------------------------------------------------- tasks


def evaluate_retrieval(model: MugStan, records: list[VideoRecord], root: str | Path, clip: ClipSettings,
                       device: torch.device, batch_size: int = 32, workers: int = 0,
                       precision: str = "fp32", progress: bool = False) -> dict[str, float]:
    """Zero-shot retrieval over every (caption, video) of ``records``; videos that fail to decode are dropped."""
    was_training = model.training
    model.eval()
    frames, ok = encode_videos(model, records, root, clip, device, batch_size, workers, precision, progress)
    kept = [i for i in range(len(records)) if ok[i] and records[i].captions]
    captions = [c for i in kept for c in records[i].captions]
    texts = encode_texts(model, captions, device, precision=precision)
    scores = score(model, texts, frames[kept])
    model.train(was_training)
    # a caption is right for every video that carries it (duplicated captions are not misses)
    videos = [records[i] for i in kept]
    tolerance = score_tolerance(frames.shape[-1])
    metrics = retrieval_metrics(scores, relevance_by_caption(captions, [v.captions for v in videos]), tolerance)
    pairwise = pairwise_from_pairs(scores, captions, videos, tolerance)
    if pairwise is not None:
        metrics["pairwise_acc"] = pairwise
    metrics.update({"videos": len(kept), "texts": len(captions), "failed_videos": len(records) - int(ok.sum())})
    return metrics


def evaluate_recognition(model: MugStan, records: list[VideoRecord], class_names: list[str], root: str | Path,
                         clip: ClipSettings, device: torch.device, batch_size: int = 32, workers: int = 0,
                         precision: str = "fp32", progress: bool = False) -> dict[str, float]:
    """Zero-shot recognition: class names (no prompt template) as captions; labels are names, SSv2 templates or
    indices (:class:`mugstan_train.recognition_data.ClassIndex`). Leaves the model in the mode it came in."""
    was_training = model.training
    model.eval()
    classes = ClassIndex(class_names)
    # a record without a label (evaluation shards) is labelled by its caption
    labels = [classes(r.label if r.label is not None else (r.captions or [None])[0], f"video {r.video}")
              for r in records]
    frames, ok = encode_videos(model, records, root, clip, device, batch_size, workers, precision, progress)
    texts = encode_texts(model, class_names, device, precision=precision)
    scores = score(model, texts, frames[ok])
    model.train(was_training)
    metrics = classification_metrics(scores, torch.tensor(labels)[ok])
    metrics.update({"videos": int(ok.sum()), "classes": len(class_names), "failed_videos": len(records) - int(ok.sum())})
    return metrics


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from mugstan_train.params import add_data_arguments

    p = argparse.ArgumentParser(prog="mugstan-evaluate",
                                description="Zero-shot retrieval / recognition of a Mug-STAN model or plain CLIP.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a directory written by MugStan.save_pretrained (e.g. OUT/final)")
    src.add_argument("--backbone", help="plain-CLIP baseline: a backbone argument as in post_pretrain.py")
    p.add_argument("--task", choices=("retrieval", "recognition"), default="retrieval")
    p.add_argument("--data", required=True, help="annotations (.csv/.tsv/.json/.jsonl)")
    p.add_argument("--video-root", default=".")
    add_data_arguments(p)
    p.add_argument("--class-names", help="recognition: one class name per line, or JSON: a list, or name -> index "
                   "(SSv2's something-something-v2-labels.json)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per clip (default: what the checkpoint was trained with, else 12)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--text-length", type=int, default=None, help="default: the checkpoint's (64)")
    p.add_argument("--mug-mode", choices=MODES, default=None,
                   help="score with this Mug mode (default: the checkpoint's own; converted released weights use "
                        "frame-token-simple; the --backbone baseline uses mean)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="write the metrics as JSON here (a new file, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its line")
    add_progress_flag(p)
    return p


PROG = "mugstan-evaluate"


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) before any model loads: files that are not there, an output in the way."""
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.task == "recognition":
        if not args.class_names:
            parser.error("--task recognition needs --class-names")
        if not Path(args.class_names).is_file():
            parser.error(f"--class-names {args.class_names}: no such file")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        parser.error(f"--checkpoint {args.checkpoint}: no such folder")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            parser.error(f"--output {out} is a folder; name a .json file")
        if out.exists() and not args.overwrite:
            parser.error(f"--output {out} exists; pass --overwrite to replace it")
        if not out.parent.exists():
            parser.error(f"--output {out}: the folder {out.parent} does not exist")


def load_model(checkpoint: str | None, backbone: str | None, text_length: int | None) -> MugStan:
    """A saved model, or the plain-CLIP baseline (no STAN, mean pooling) of a backbone."""
    from mugstan_train.params import model_config

    if checkpoint:
        model = MugStan.from_pretrained(checkpoint)
        if text_length is not None:
            model.config.context_length = text_length
        return model
    return MugStan(model_config(backbone, no_stan=True, text_length=text_length or 64)).eval()


def main(argv: list[str] | None = None) -> int:
    """Evaluates; bad arguments exit 2 before any model loads, errors print one line and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return run_reporting_errors(PROG, args.debug, _evaluate, args, expected=(DataError,))


def _evaluate(args: argparse.Namespace) -> int:
    from mugstan_train.params import columns_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model = load_model(args.checkpoint, args.backbone, args.text_length).to(device)
    if args.mug_mode:
        model.config.mug = dataclasses.replace(model.config.mug, mode=args.mug_mode)
    frames = args.frames or model.config.frames or 12
    clip = ClipSettings(frames=frames, size=args.image_size or model.image_size)
    columns = columns_from_args(args)
    if args.task == "recognition":
        names = read_class_names(args.class_names)
        metrics = evaluate_recognition(model, read_annotations(args.data, recognition_columns(columns)), names,
                                       args.video_root, clip, device, args.batch_size, args.workers, args.precision,
                                       progress=not args.no_progress)
    else:
        metrics = evaluate_retrieval(model, read_annotations(args.data, columns), args.video_root, clip, device,
                                     args.batch_size, args.workers, args.precision, progress=not args.no_progress)
    metrics["mug_mode"] = model.config.mug.mode
    metrics["frames"] = frames
    for key, value in metrics.items():
        print(f"{key:>10s}  {value:.2f}" if isinstance(value, float) else f"{key:>10s}  {value}")
    if args.output:  # a temporary file renamed into place: never a half-written JSON
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
