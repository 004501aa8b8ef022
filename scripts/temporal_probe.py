"""Temporal probe: does the model know which way time runs? (plain-CLIP mean baseline vs STAN + Mug)

Mirrors the paper's setting on a tiny scale, using the trainer itself
(:func:`training.post_pretrain.train`) for every stage:

1. **image-text warm-up** (shared): the tiny random CLIP is first trained as an
   image-language model on single frames (``--frames 1 --no-stan --mug-mode mean``,
   one random frame per visit) with appearance-only captions derived from the
   video captions ("a red circle moving left" -> "a red circle"). Mug-STAN
   post-pretrains a *pretrained* CLIP; from a random tower Mug's frame-token head
   collapses (docs/temporal_probe.md).
2. **video-text post-pretraining**: every variant starts from that same checkpoint
   (``--init-from``; STAN's intra-frame modules copy the warmed-up layers) with the
   same budget, on synthetic clips whose caption depends on frame order
   (``moving left`` / ``moving right``, ``growing`` / ``shrinking``...), with a clip
   and its time-reversed partner in the same batch (``--group-column pair``, hard
   negatives), STAN's learning rate 10x the backbone's as in the paper.

Then, on held-out pairs, each test clip and its exact time reversal (the same
decoded frames, flipped) are scored against the correct caption and the reversed one.

* pairwise accuracy: fraction of clips whose correct caption scores above the
  reversed caption; ties count 0.5. A model whose video embedding ignores frame
  order scores a clip and its reversal identically, so it gets exactly 0.5.
* R@1: text-to-video and video-to-text over the gallery of test clips and their
  reversals (clips with identical captions all count as correct; ties count against).

Usage (CPU, one thread)::

    python scripts/temporal_probe.py --out-dir runs/temporal_probe
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training` is not an installed package

import torch  # noqa: E402

from mugstan_chat.model import MugStan  # noqa: E402
from mugstan_chat.synthetic import MOTIONS, make_synthetic_videos  # noqa: E402

from training.data import ClipSettings, EvalDataset, read_annotations  # noqa: E402
from training.evaluate import encode_clips, encode_texts, pairwise_accuracy, retrieval_metrics, score  # noqa: E402
from training.post_pretrain import train  # noqa: E402

# Headline STAN row first: Mug's default frame-token mode; frame-text (paper Table VIII) for comparison.
VARIANTS = {
    "plain CLIP (mean)": ["--no-stan", "--mug-mode", "mean"],
    "STAN + Mug frame-token": ["--mug-mode", "frame-token"],
    "STAN + Mug frame-text": ["--mug-mode", "frame-text"],
}
VERBS = sorted({verb for pair in MOTIONS.values() for verb in pair}, key=len, reverse=True)


def appearance_caption(caption: str) -> str:
    """The image caption of a frame: the video caption without its (order-dependent) motion verb."""
    for verb in VERBS:
        if caption.endswith(" " + verb):
            return caption[: -len(verb) - 1]
    raise ValueError(f"caption {caption!r} has no known motion verb")


def write_image_captions(data: Path) -> Path:
    """``image_captions.csv`` beside ``annotations.csv``: same videos, appearance-only captions."""
    with open(data / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    path = data / "image_captions.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "caption", "pair"])
        writer.writeheader()
        writer.writerows({**row, "caption": appearance_caption(row["caption"])} for row in rows)
    return path


def _test_pairs(data: Path) -> list[tuple[str, str, str]]:
    """(forward video, forward caption, reversed caption) per held-out pair."""
    with open(data / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_pair: dict[str, list[dict]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], []).append(row)
    return [(a["video"], a["caption"], b["caption"]) for a, b in by_pair.values()]


@torch.no_grad()
def probe(model: MugStan, data: Path, frames: int) -> dict[str, float]:
    """Pairwise accuracy and R@1 of a model on held-out clips and their exact time reversals."""
    model.eval()
    pairs = _test_pairs(data)
    records = read_annotations(data / "annotations.csv")
    by_name = {r.video: r for r in records}
    dataset = EvalDataset([by_name[v] for v, _, _ in pairs], data, ClipSettings(frames=frames, size=model.image_size))
    clips = torch.stack([dataset[i]["video"] for i in range(len(pairs))])  # (N, T, 3, H, W)
    gallery = torch.cat([clips, clips.flip(1)])  # forward clips, then the same frames reversed: (2N, ...)
    captions = [fwd for _, fwd, _ in pairs] + [rev for _, _, rev in pairs]  # caption of each gallery clip
    wrong = [rev for _, _, rev in pairs] + [fwd for _, fwd, _ in pairs]
    device = next(model.parameters()).device
    video_feats = encode_clips(model, gallery, device)
    unique = sorted(set(captions))
    scores = score(model, encode_texts(model, unique, device), video_feats)  # (captions, 2N)
    row = {c: i for i, c in enumerate(unique)}
    columns = torch.arange(len(captions))
    correct = scores[[row[c] for c in captions], columns]
    reversed_ = scores[[row[c] for c in wrong], columns]
    relevant = torch.tensor([[c == u for c in captions] for u in unique])
    metrics = retrieval_metrics(scores, relevant)
    return {"pairwise_acc": pairwise_accuracy(correct, reversed_), "t2v_R@1": metrics["t2v_R@1"],
            "v2t_R@1": metrics["v2t_R@1"], "test_clips": len(captions)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs/temporal_probe")
    p.add_argument("--train-pairs", type=int, default=96)
    p.add_argument("--test-pairs", type=int, default=24)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000, help="video-text steps of every variant")
    p.add_argument("--batch-size", type=int, default=16, help="video-text batch (8 pairs when grouped)")
    p.add_argument("--lr", type=float, default=3e-4, help="backbone learning rate of the video-text stage")
    p.add_argument("--stan-lr-ratio", type=float, default=10.0, help="STAN lr = ratio x --lr (paper: 10)")
    p.add_argument("--image-steps", type=int, default=600, help="image-text warm-up steps (0: start random)")
    p.add_argument("--image-batch-size", type=int, default=32)
    p.add_argument("--image-lr", type=float, default=1e-3, help="warm-up lr (the tiny backbone starts random)")
    p.add_argument("--no-group", action="store_true", help="random batches instead of pairs batched together")
    p.add_argument("--stan-layers", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), metavar="NAME",
                   help=f"subset of {list(VARIANTS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out_dir)
    train_data, test_data = out / "data" / "train", out / "data" / "test"
    for folder, pairs, seed in ((train_data, args.train_pairs, args.seed), (test_data, args.test_pairs, args.seed + 1000)):
        if not (folder / "annotations.csv").is_file():
            make_synthetic_videos(folder, num=2 * pairs, seed=seed, size=64, frames=24)
    common = ["--backbone", "tiny", "--video-root", str(train_data), "--weight-decay", "0.05",
              "--seed", str(args.seed), "--workers", str(args.workers),
              "--save-interval", "0", "--keep-checkpoints", "1", "--log-interval", "50"]
    init, warmup_seconds = [], 0.0
    if args.image_steps > 0:  # stage 1: the shared image-text warm-up (plain CLIP on single frames)
        start = time.time()
        warm = train([*common, "--train-data", str(write_image_captions(train_data)), "--frames", "1",
                      "--batch-size", str(args.image_batch_size), "--no-stan", "--mug-mode", "mean",
                      "--max-steps", str(args.image_steps),
                      "--lr-backbone", str(args.image_lr), "--lr-stan", str(args.image_lr),
                      "--warmup-steps", str(max(1, args.image_steps // 20)),
                      "--output-dir", str(out / "runs" / "image-text-warmup")])
        warmup_seconds = round(time.time() - start, 1)
        init = ["--init-from", str(warm.final_dir)]
        print(f"image-text warm-up: {args.image_steps} steps, final loss {warm.losses[-1]:.3f}, "
              f"{warmup_seconds:.0f} s", flush=True)
    results = {}
    for name in [v for v in VARIANTS if v in args.variants]:  # stage 2: every variant from the same start
        run_dir = out / "runs" / name.lower().replace(" + ", "-").replace(" ", "-").replace("(", "").replace(")", "")
        start = time.time()
        result = train([*common, *init, *([] if args.no_group else ["--group-column", "pair"]),
                        "--train-data", str(train_data / "annotations.csv"), "--frames", str(args.frames),
                        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                        "--lr-backbone", str(args.lr), "--lr-stan", str(args.lr * args.stan_lr_ratio), "--warmup-steps",
                        str(max(1, args.steps // 20)), "--stan-layers", str(args.stan_layers),
                        "--output-dir", str(run_dir), *VARIANTS[name]])
        model = MugStan.from_pretrained(result.final_dir)
        results[name] = {**probe(model, test_data, args.frames), "final_loss": result.losses[-1],
                         "train_seconds": round(time.time() - start, 1)}
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{'variant':<24s} {'pairwise acc':>12s} {'t2v R@1':>8s} {'v2t R@1':>8s} {'loss':>7s} {'time s':>7s}")
    for name, r in results.items():
        print(f"{name:<24s} {r['pairwise_acc']:>12.3f} {r['t2v_R@1']:>8.1f} {r['v2t_R@1']:>8.1f} "
              f"{r['final_loss']:>7.3f} {r['train_seconds']:>7.1f}")
    print(f"(shared image-text warm-up: {warmup_seconds:.0f} s)")
    report = {"settings": vars(args), "warmup_seconds": warmup_seconds, "results": results}
    (out / "temporal_probe.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'temporal_probe.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
