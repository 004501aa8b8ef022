"""Temporal probe: does the model know which way time runs? (plain-CLIP mean baseline vs STAN + Mug)

Trains both variants with the same budget, from the same tiny random backbone,
on synthetic clips whose caption depends on frame order (``moving left`` vs
``moving right``, ``growing`` vs ``shrinking``...), using the trainer itself
(:func:`training.post_pretrain.train`). Then, on held-out pairs, each test clip
and its exact time reversal (the same decoded frames, flipped) are scored
against the correct caption and the reversed one.

* pairwise accuracy: fraction of clips whose correct caption scores above the
  reversed caption; ties count 0.5. A model whose video embedding ignores frame
  order scores a clip and its reversal identically, so it gets exactly 0.5.
* R@1: text-to-video and video-to-text over the gallery of test clips and their
  reversals (clips with identical captions all count as correct; ties count against).

Usage (CPU, a few minutes)::

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
from mugstan_chat.synthetic import make_synthetic_videos  # noqa: E402

from training.data import ClipSettings, EvalDataset, read_annotations  # noqa: E402
from training.evaluate import encode_clips, encode_texts, pairwise_accuracy, retrieval_metrics, score  # noqa: E402
from training.post_pretrain import train  # noqa: E402

# Mug's full frame-token mode collapses from a *random* text tower (see docs/temporal_probe.md), so the
# headline STAN row uses Mug's frame-text variant (paper Table VIII); the frame-token row documents the collapse.
VARIANTS = {
    "plain CLIP (mean)": ["--no-stan", "--mug-mode", "mean"],
    "STAN + Mug frame-text": ["--mug-mode", "frame-text"],
    "STAN + Mug frame-token": ["--mug-mode", "frame-token"],
}


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
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="both groups: the tiny backbone starts random")
    p.add_argument("--stan-layers", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out_dir)
    train_data, test_data = out / "data" / "train", out / "data" / "test"
    for folder, pairs, seed in ((train_data, args.train_pairs, args.seed), (test_data, args.test_pairs, args.seed + 1000)):
        if not (folder / "annotations.csv").is_file():
            make_synthetic_videos(folder, num=2 * pairs, seed=seed, size=64, frames=24)
    results = {}
    for name, extra in VARIANTS.items():
        run_dir = out / "runs" / name.lower().replace(" + ", "-").replace(" ", "-").replace("(", "").replace(")", "")
        start = time.time()
        result = train(["--backbone", "tiny", "--train-data", str(train_data / "annotations.csv"),
                        "--video-root", str(train_data), "--frames", str(args.frames), "--batch-size",
                        str(args.batch_size), "--max-steps", str(args.steps), "--lr-backbone", str(args.lr),
                        "--lr-stan", str(args.lr), "--warmup-steps", str(max(1, args.steps // 20)),
                        "--weight-decay", "0.05", "--stan-layers", str(args.stan_layers), "--seed", str(args.seed),
                        "--workers", str(args.workers), "--save-interval", "0", "--keep-checkpoints", "1",
                        "--log-interval", "10", "--output-dir", str(run_dir), *extra])
        model = MugStan.from_pretrained(result.final_dir)
        results[name] = {**probe(model, test_data, args.frames), "final_loss": result.losses[-1],
                         "train_seconds": round(time.time() - start, 1)}
    print(f"\n{'variant':<24s} {'pairwise acc':>12s} {'t2v R@1':>8s} {'v2t R@1':>8s} {'loss':>7s} {'time s':>7s}")
    for name, r in results.items():
        print(f"{name:<24s} {r['pairwise_acc']:>12.3f} {r['t2v_R@1']:>8.1f} {r['v2t_R@1']:>8.1f} "
              f"{r['final_loss']:>7.3f} {r['train_seconds']:>7.1f}")
    report = {"settings": vars(args), "results": results}
    (out / "temporal_probe.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'temporal_probe.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
