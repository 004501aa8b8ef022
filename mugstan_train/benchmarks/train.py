"""Training-step cost of plain CLIP, STAN and STAN+Mug at the same batch and frames.

Random weights at real shapes (no download): `tiny` on CPU, `b32` (CLIP ViT-B/32)
and `l14` (CLIP ViT-L/14, 224 px) on a GPU. Each method runs a full step
(forward, loss, backward, AdamW) with and without gradient checkpointing, in one
process on the same inputs; then the Mug score matrix is timed against batch size.

    python -m mugstan_train.benchmarks.train --shape tiny --out runs/bench/train_tiny.json
    python -m mugstan_train.benchmarks.train --shape l14 --batch 32 --frames 12 --device cuda --plot
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mugstan_chat.benchmarks import common
from mugstan_chat.model.backbone import BackboneConfig, tiny_backbone_config
from mugstan_chat.model.loss import mug_contrastive_loss
from mugstan_chat.model.dual_encoder import MugStan, MugStanConfig
from mugstan_chat.model.mug import MugConfig, score_matrix
from mugstan_chat.model.stan import StanConfig

METHODS = {  # name -> (temporal branch?, Mug mode)
    "clip-mean": (False, "mean"),
    "stan": (True, "mean"),
    "stan+mug": (True, "frame-token"),
}


def clip_shape_config(shape: str) -> BackboneConfig:
    """Random-weight transformers CLIP at a real architecture's shape."""
    if shape == "tiny":
        return tiny_backbone_config()
    vision = {"b32": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=32),
              "l14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14)}[shape]
    text = {"b32": dict(hidden_size=512, num_attention_heads=8), "l14": dict(hidden_size=768, num_attention_heads=12)}[shape]
    projection = {"b32": 512, "l14": 768}[shape]
    vision.update(intermediate_size=4 * vision["hidden_size"], image_size=224)
    text.update(intermediate_size=4 * text["hidden_size"], num_hidden_layers=12, max_position_embeddings=77,
                vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return BackboneConfig(family="hf", model_config={"vision_config": vision, "text_config": text,
                                                     "projection_dim": projection})


def _inputs(model: MugStan, batch: int, frames: int, text_length: int, device: str):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, frames, 3, model.image_size, model.image_size, generator=g)
    ids = torch.randint(1, 49000, (batch, text_length), generator=g)
    lengths = torch.randint(4, text_length, (batch,), generator=g)
    ids[torch.arange(batch), lengths] = 49407
    mask = torch.arange(text_length)[None] <= lengths[:, None]
    return video.to(device), ids.to(device), mask.to(device)


def bench_step(shape: str, method: str, checkpointing: bool, args) -> dict:
    use_stan, mode = METHODS[method]
    config = MugStanConfig(backbone=clip_shape_config(shape), stan=StanConfig() if use_stan else None,
                           mug=MugConfig(mode=mode), context_length=args.text_length)
    model = MugStan(config).to(args.device).train()
    model.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    video, ids, mask = _inputs(model, args.batch, args.frames, args.text_length, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            frames, text = model(video, ids, mask)
            loss = mug_contrastive_loss(frames.float(), text.tokens.float(), text.mask, text.pooled.float(), config.mug)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (also allocates optimizer state)
    with common.peak_memory(args.device) as memory:
        ms = common.median_ms(step, runs=args.runs, warmup=0, device=args.device)
    del model, optimizer
    return {"shape": shape, "method": method, "checkpointing": checkpointing, "batch": args.batch,
            "frames": args.frames, "step_ms": ms, "clips_per_s": args.batch / (ms / 1000),
            "peak_mb": memory["mb"], "memory_kind": memory["kind"]}


def bench_mug(batch: int, args, width: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, args.text_length, width, generator=g).to(args.device)
    mask = (torch.arange(args.text_length)[None] < args.text_length // 2).expand(batch, -1).to(args.device)
    frames = torch.randn(batch, args.frames, width, generator=g).to(args.device)
    config = MugConfig(chunk_size=args.chunk)
    with common.peak_memory(args.device) as memory:
        ms = common.median_ms(lambda: score_matrix(tokens, mask, tokens[:, 0], frames, config=config),
                                runs=args.runs, device=args.device)
    return {"batch": batch, "frames": args.frames, "tokens": args.text_length, "width": width,
            "chunk": args.chunk, "score_matrix_ms": ms, "peak_mb": memory["mb"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mugstan_train.benchmarks.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "b32", "l14"], default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-checkpointing-variant", action="store_true", help="skip the checkpointed runs")
    parser.add_argument("--mug-batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--plot", action="store_true", help="write PNG plots next to --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [False] if args.no_checkpointing_variant else [False, True]
    steps = [bench_step(args.shape, m, c, args) for c in variants for m in args.methods]
    base = {(r["checkpointing"]): r["step_ms"] for r in steps if r["method"] == "clip-mean"}
    for row in steps:
        if row["checkpointing"] in base:
            row["vs_clip"] = row["step_ms"] / base[row["checkpointing"]]
    width = clip_shape_config(args.shape).model_config["projection_dim"]
    mug_rows = [bench_mug(b, args, width) for b in args.mug_batches]
    print(f"## Training step, {args.shape} shape, batch {args.batch}, {args.frames} frames "
          f"({common.machine_description(args.device)})\n")
    print(common.markdown_table(steps, ["method", "checkpointing", "step_ms", "clips_per_s", "peak_mb", "vs_clip"]))
    print(f"\n## Mug score matrix vs batch ({args.frames} frames, {args.text_length} tokens, width {width})\n")
    print(common.markdown_table(mug_rows, ["batch", "score_matrix_ms", "peak_mb"]))
    target = next((r["vs_clip"] for r in steps if r["method"] == "stan+mug" and not r["checkpointing"]), None)
    if target is not None:
        print(f"\nTarget: step(STAN+Mug) <= 1.5 x step(plain CLIP): {target:.2f}x -> {'met' if target <= 1.5 else 'not met'}")
    payload = {"machine": common.machine_description(args.device), "args": vars(args), "steps": steps,
               "mug": mug_rows, "stan_mug_vs_clip": target}
    common.write_json(args.out, payload)
    if args.plot and args.out:
        _plot(steps, mug_rows, Path(args.out).with_suffix(""))
    return 0


def _plot(steps, mug_rows, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for checkpointing in (False, True):
        rows = [r for r in steps if r["checkpointing"] == checkpointing]
        if rows:
            axes[0].bar([f"{r['method']}{' (ckpt)' if checkpointing else ''}" for r in rows],
                        [r["step_ms"] for r in rows])
    axes[0].set_ylabel("step ms")
    axes[0].tick_params(axis="x", rotation=30)
    axes[1].plot([r["batch"] for r in mug_rows], [r["score_matrix_ms"] for r in mug_rows], marker="o")
    axes[1].set_xlabel("batch")
    axes[1].set_ylabel("Mug score matrix ms")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(f"{stem}_train.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
