"""Temporal probe: does the model know which way time runs? (plain-CLIP mean baseline vs STAN + Mug)

One fixed recipe, decided in advance and the same for every motion family and for
users' own data, run with the trainer itself (:func:`mugstan_train.post_pretrain.train`):

1. **image-text warm-up** (shared): the tiny random CLIP is first trained as an
   image-language model on single frames (``--frames 1 --no-stan --mug-mode mean``)
   with the appearance-only captions of the ``appearance`` column ("a red circle"):
   Mug-STAN post-pretrains a *pretrained* CLIP. Skipped when the data has no such column.
2. **video-text warm-up** (shared): STAN + Mug with the end-of-text head (``frame-text``)
   on the full captions. From the image-text warm-up alone, Mug's frame-token head stays
   at the order-blind floor even on two memorised pairs: about half of its token weight
   sits on tokens that are identical in both captions of a pair (causal mask), the two
   captions tie, and a tie is a stationary point. The end-of-text head leaves it at once;
   after it, frame-token learns (docs/temporal_probe.md, "Diagnosis").
3. **video-text post-pretraining**: every variant starts from that run with the same
   budget (``--init-from``; STAN variants keep its branch, ``--init-stan``, the baseline
   takes its towers), a clip and its time-reversed partner in the same batch
   (``--group-column pair``), STAN's learning rate 10x the backbone's.

Then each held-out clip and its exact time reversal (the same decoded frames,
flipped) are scored against the clip's caption and its partner's:

* pairwise accuracy, per motion family (``family`` column) and overall: the right
  caption above the reversed one; ties (within fp32 summation noise) count 0.5, so a
  model blind to frame order gets exactly 0.5;
* R@1 over the gallery of clips and reversals (ties count against).

Data: by default all motion families of :mod:`mugstan_chat.synthetic.families`, generated under
``OUT/data``; or any folder of time-reversal pairs in the same layout
(``--train-data DIR --test-data DIR``: ``DIR/annotations.csv`` with ``video``,
``caption``, ``pair``, optional ``appearance`` and ``family``). Each variant's model
is exported under ``OUT/runs/<variant>/final``; ``OUT/temporal_probe.json`` holds
every figure.

Usage (CPU)::

    python -m mugstan_train.temporal_probe --out-dir runs/temporal_probe            # about 58 min, 1 thread
    python -m mugstan_train.temporal_probe --out-dir runs/temporal_probe --print-commands   # the trainer commands
    python -m mugstan_train.temporal_probe --out-dir runs/quick --quick             # a few minutes, fewer pairs
    python -m mugstan_train.temporal_probe --out-dir runs/mine --train-data my/train --test-data my/test
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import time
from pathlib import Path

import torch

from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.synthetic.families import FAMILIES, make_time_reversal_dataset

from mugstan_train.data import ClipSettings, EvalDataset, VideoRecord
from mugstan_train.evaluate import (encode_clips, encode_texts, pairwise_accuracy, retrieval_metrics,
                                    score, score_tolerance)
from mugstan_train.post_pretrain import train

# The recipe, fixed in advance: no per-family or per-dataset settings.
RECIPE = {
    "image_steps": 300, "image_batch_size": 32, "image_lr": 1e-3,
    "video_warmup_steps": 1000,
    "steps": 5000, "batch_size": 16, "frames": 8, "lr_backbone": 3e-4, "lr_stan": 3e-3,
    "stan_layers": 4, "weight_decay": 0.05, "warmup_fraction": 0.05,
}
QUICK = {"steps": 300, "image_steps": 150, "video_warmup_steps": 300}
DATA = {"train_pairs_per_family": 48, "test_pairs_per_family": 24}
QUICK_DATA = {"train_pairs_per_family": 6, "test_pairs_per_family": 2}
# Headline STAN row first: Mug's default frame-token mode; frame-text (paper Table VIII) on request.
VARIANTS = {
    "plain CLIP (mean)": ["--no-stan", "--mug-mode", "mean"],
    "STAN + Mug frame-token": ["--mug-mode", "frame-token"],
    "STAN + Mug frame-text": ["--mug-mode", "frame-text"],
}
DEFAULT_VARIANTS = ["plain CLIP (mean)", "STAN + Mug frame-token"]
REQUIRED = ("video", "caption", "pair")


class ProbeDataError(ValueError):
    """A --train-data / --test-data folder is not in the probe's layout."""


def read_pairs(folder: Path) -> list[dict]:
    """The rows of ``folder/annotations.csv``, checked: the columns exist and every pair has two captions."""
    path = folder / "annotations.csv"
    if not path.is_file():
        raise ProbeDataError(f"{path}: no such file (expected columns {', '.join(REQUIRED)}[, appearance, family])")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in REQUIRED if not rows or c not in rows[0]]
    if missing:
        raise ProbeDataError(f"{path}: missing column(s) {missing}")
    pairs: dict[str, list[dict]] = {}
    for row in rows:
        pairs.setdefault(row["pair"], []).append(row)
    bad = [p for p, members in pairs.items() if len(members) != 2 or members[0]["caption"] == members[1]["caption"]]
    if bad:
        raise ProbeDataError(f"{path}: pair(s) {bad[:5]} do not hold exactly two clips with different captions")
    return rows


def _slug(name: str) -> str:
    return name.lower().replace(" + ", "-").replace(" ", "-").replace("(", "").replace(")", "")


@torch.no_grad()
def probe(model: MugStan, data: Path, frames: int) -> dict:
    """Pairwise accuracy (overall and per family) and R@1 on held-out clips and their exact reversals."""
    model.eval()
    rows = read_pairs(data)
    first = {}
    for row in rows:
        first.setdefault(row["pair"], row)
    partner = {row["pair"]: row["caption"] for row in rows if first[row["pair"]] is not row}
    tests = list(first.values())
    dataset = EvalDataset([VideoRecord(r["video"], [r["caption"]]) for r in tests], data,
                          ClipSettings(frames=frames, size=model.image_size))
    items = [dataset[i] for i in range(len(tests))]
    failed = [tests[i]["video"] for i, item in enumerate(items) if not item["ok"]]
    if failed:
        raise ProbeDataError(f"{data}: cannot decode {failed[:5]}")
    clips = torch.stack([item["video"] for item in items])  # (N, T, 3, H, W)
    gallery = torch.cat([clips, clips.flip(1)])  # forward clips, then the same frames reversed
    captions = [r["caption"] for r in tests] + [partner[r["pair"]] for r in tests]
    wrong = [partner[r["pair"]] for r in tests] + [r["caption"] for r in tests]
    device = next(model.parameters()).device
    video = encode_clips(model, gallery, device)
    unique = sorted(set(captions))
    scores = score(model, encode_texts(model, unique, device), video)  # (captions, 2N)
    row = {c: i for i, c in enumerate(unique)}
    columns = torch.arange(len(captions))
    correct, reversed_ = scores[[row[c] for c in captions], columns], scores[[row[c] for c in wrong], columns]
    tolerance = score_tolerance(video.shape[-1])
    families = [r.get("family") or "all" for r in tests] * 2
    per_family = {}
    for family in dict.fromkeys(families):
        keep = torch.tensor([f == family for f in families])
        per_family[family] = pairwise_accuracy(correct[keep], reversed_[keep], tolerance)
    relevant = torch.tensor([[c == u for c in captions] for u in unique])
    metrics = retrieval_metrics(scores, relevant, tolerance)
    return {"pairwise_acc": pairwise_accuracy(correct, reversed_, tolerance), "per_family": per_family,
            "t2v_R@1": metrics["t2v_R@1"], "v2t_R@1": metrics["v2t_R@1"], "test_clips": len(captions)}


def order_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, order sensitivity) from a run's training log."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["order_sensitivity"]) for r in records if r.get("type") == "diagnostics"]


def training_summary(run_dir: Path, losses: list[float], grouped: bool) -> dict:
    """Smoothed final loss (mean of the last 10% of steps), the order-blind floor, and order sensitivity."""
    tail = losses[-max(1, len(losses) // 10):]
    order = order_curve(run_dir)
    return {
        "smoothed_final_loss": sum(tail) / len(tail),
        # in a batch made only of pairs, a model blind to order can at best tie each clip with its
        # reversal in both directions of the loss: ln 2 + ln 2
        "order_blind_floor": 2 * math.log(2) if grouped else None,
        "order_sensitivity": order,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mugstan_train.temporal_probe", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs/temporal_probe")
    p.add_argument("--train-data", type=Path, default=None, help="folder of time-reversal pairs (annotations.csv)")
    p.add_argument("--test-data", type=Path, default=None, help="held-out folder in the same layout")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="motion families to generate (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer pairs and steps ({QUICK_DATA}, {QUICK}): a smoke run, not the measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the tiny model)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--print-commands", action="store_true",
                   help="print the recipe as training/post_pretrain.py commands (run by hand, same result) and exit")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=DEFAULT_VARIANTS, metavar="NAME",
                   help=f"any of {list(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    return p


def plan_stages(recipe: dict, train_data: Path, out: Path, *, clips: int, appearance: bool, seed: int,
                workers: int, variants: list[str]) -> list[tuple[str, list[str]]]:
    """The recipe as trainer argument lists, in order: (run name, ``post_pretrain.py`` arguments).

    Every stage starts from the previous stage's ``final/`` export. Batches never ask for
    more clips than the folder holds (pairs keep the count even).
    """
    runs = out / "runs"
    annotations = str(train_data / "annotations.csv")
    common = ["--backbone", "tiny", "--train-data", annotations, "--video-root", str(train_data),
              "--weight-decay", str(recipe["weight_decay"]), "--seed", str(seed), "--workers", str(workers),
              "--save-interval", "0", "--log-interval", "50", "--diagnostics-interval", "100"]

    def warmup(steps: int) -> list[str]:
        return ["--max-steps", str(steps), "--warmup-steps", str(max(1, round(recipe["warmup_fraction"] * steps)))]

    stages, init, keep_stan = [], [], False
    if appearance and recipe["image_steps"] > 0:  # stage 1, shared by every variant
        stages.append(("image-text-warmup", [
            *common, "--caption-column", "appearance", "--frames", "1", "--no-stan", "--mug-mode", "mean",
            "--batch-size", str(min(recipe["image_batch_size"], clips)), *warmup(recipe["image_steps"]),
            "--lr-backbone", str(recipe["image_lr"]), "--lr-stan", str(recipe["image_lr"]),
            "--output-dir", str(runs / "image-text-warmup")]))
        init = ["--init-from", str(runs / "image-text-warmup" / "final")]
    video = ["--group-column", "pair", "--frames", str(recipe["frames"]),
             "--batch-size", str(min(recipe["batch_size"], clips)), "--lr-backbone", str(recipe["lr_backbone"]),
             "--lr-stan", str(recipe["lr_stan"]), "--stan-layers", str(recipe["stan_layers"])]
    if recipe["video_warmup_steps"] > 0:  # stage 2, shared: the towers learn the captions' motion words
        stages.append(("video-text-warmup", [*common, *init, *video, *warmup(recipe["video_warmup_steps"]),
                                             "--mug-mode", "frame-text", "--output-dir", str(runs / "video-text-warmup")]))
        init, keep_stan = ["--init-from", str(runs / "video-text-warmup" / "final")], True
    for name in [v for v in VARIANTS if v in variants]:  # stage 3: every variant from the same start
        carry = ["--init-stan"] if keep_stan and "--no-stan" not in VARIANTS[name] else []  # STAN goes on
        stages.append((name, [*common, *init, *carry, *video, *warmup(recipe["steps"]), *VARIANTS[name],
                              "--output-dir", str(runs / _slug(name))]))
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.train_data is None) != (args.test_data is None):
        parser.error("--train-data and --test-data go together")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recipe = {**RECIPE, **(QUICK if args.quick else {})}
    out = Path(args.out_dir)
    started = time.time()
    sizes = QUICK_DATA if args.quick else DATA
    generated = args.train_data is None
    if generated:
        train_data, test_data = out / "data" / "train", out / "data" / "test"
    else:
        train_data, test_data = args.train_data, args.test_data
    if generated and args.print_commands:  # the generated folders' shape is known without generating them
        clips, appearance = 2 * sizes["train_pairs_per_family"] * len(args.families), True
    else:
        if generated:
            for folder, pairs, seed in ((train_data, sizes["train_pairs_per_family"], args.seed),
                                        (test_data, sizes["test_pairs_per_family"], args.seed + 1000)):
                if not (folder / "annotations.csv").is_file():
                    make_time_reversal_dataset(folder, pairs, seed=seed, families=args.families)
        try:
            train_rows, _ = read_pairs(train_data), read_pairs(test_data)
        except ProbeDataError as error:
            parser.exit(2, f"error: {error}\n")
        clips, appearance = len(train_rows), "appearance" in train_rows[0]
    stages = plan_stages(recipe, train_data, out, clips=clips, appearance=appearance, seed=args.seed,
                         workers=args.workers, variants=args.variants)
    if args.print_commands:
        for name, stage_args in stages:
            print(f"# {name}\npython training/post_pretrain.py {shlex.join(stage_args)}\n")
        return 0
    if not appearance:
        print("no 'appearance' column: no image-text warm-up (the tiny tower starts random)", flush=True)
    results, seconds = {}, {}
    for name, stage_args in stages:
        start = time.time()
        result = train(stage_args)
        seconds[name] = round(time.time() - start, 1)
        if name not in VARIANTS:
            print(f"{name}: {seconds[name]:.0f} s", flush=True)
            continue
        model = MugStan.from_pretrained(result.final_dir)
        run_dir = out / "runs" / _slug(name)
        results[name] = {**probe(model, test_data, recipe["frames"]),
                         **training_summary(run_dir, result.losses, grouped=True),
                         "train_seconds": seconds[name], "model": str(result.final_dir)}
        print(f"{name}: pairwise {results[name]['pairwise_acc']:.3f} ({seconds[name]:.0f} s)", flush=True)
    report = {"settings": {**vars(args), "train_data": str(train_data), "test_data": str(test_data)},
              "recipe": recipe, "warmup_seconds": seconds.get("image-text-warmup", 0.0),
              "video_warmup_seconds": seconds.get("video-text-warmup", 0.0),
              # where the order signal first grows: STAN variants go on from this run's branch
              "video_warmup_order_sensitivity": (order_curve(out / "runs" / "video-text-warmup")
                                                 if "video-text-warmup" in seconds else []),
              "wall_seconds": round(time.time() - started, 1),
              "commands": [["python", "training/post_pretrain.py", *stage_args] for _, stage_args in stages],
              "results": results}
    print_table(results)
    (out / "temporal_probe.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out / 'temporal_probe.json'} ({report['wall_seconds'] / 60:.1f} min)")
    return 0


def print_table(results: dict) -> None:
    families = list(next(iter(results.values()))["per_family"]) if results else []
    print(f"\n{'variant':<24s} {'pairwise':>8s} " + " ".join(f"{f[:9]:>9s}" for f in families)
          + f" {'t2v R@1':>8s} {'loss':>6s} {'floor':>6s} {'order':>7s}")
    for name, r in results.items():
        order = r["order_sensitivity"][-1][1] if r["order_sensitivity"] else float("nan")
        print(f"{name:<24s} {r['pairwise_acc']:>8.3f} " + " ".join(f"{r['per_family'][f]:>9.3f}" for f in families)
              + f" {r['t2v_R@1']:>8.1f} {r['smoothed_final_loss']:>6.3f} {r['order_blind_floor']:>6.3f} "
              f"{order:>7.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
