"""What question-aware clip selection costs (docs/design.md section 4c; docs/performance.md).

Usage::

    mugstan-chat bench selection --size small --device cpu --threads 2 --candidates 16 32 64 \
        --frames 2 --select 4 --out runs/bench/selection_small_cpu.json

A synthetic 30-minute video (128x96 at 2 fps, coloured segments) is split into M candidate
clips of T frames. For each M, with a fresh feature cache, it measures: decoding and embedding
the M candidates through the video tower to its last layer (the one-time cost per video),
ranking them against a first question (text tower + Mug) and against follow-ups (the candidates
come from the cache: text tower + Mug only), encoding the K chosen clips for the chat, and the
visual tokens saved against showing all M. No language model runs: selection happens before
the prompt. ``--size small`` is LLaVA-1.5's CLIP ViT-L/14 at 336 px with a random STAN branch
and a random CLIP-L text tower (12 layers, 768 wide): timings only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import machine_description, markdown_table, write_json


QUESTIONS = ["what does she do after opening the fridge?", "when does the red part start?",
             "what colour comes last?", "is there a green segment?", "what happens in the middle?", "describe it"]


def write_long_video(path: Path, seconds: int, fps: int = 2) -> Path:
    from mugstan_chat.video import write_video

    rng = np.random.default_rng(0)
    colours = rng.integers(30, 230, size=(seconds // 60 + 1, 3))  # one colour per minute
    frames = (np.full((96, 128, 3), colours[(i // fps) // 60], dtype=np.uint8) for i in range(seconds * fps))
    write_video(path, frames, fps=fps, options={"preset": "ultrafast", "g": "60"})
    return path


def random_retriever(chat_model, width: int, layers: int, projection: int):
    """A random CLIP text tower of the given shape and a visual projection onto LLaVA's tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from mugstan_chat.model.backbone import HFCLIPText
    from mugstan_chat.model.mug import MugConfig
    from mugstan_chat.llava.retrieval import Retriever
    from mugstan_chat.model.tokenizer import CaptionTokenizer

    tower = chat_model.tower
    config = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // 64), max_position_embeddings=77, vocab_size=49408,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text = HFCLIPText(CLIPTextModel(config).eval(), torch.nn.Linear(width, projection, bias=False))
        visual = torch.nn.Linear(tower.backbone.width, projection, bias=False)
    dtype, device = tower.dtype, tower.device
    return Retriever(tower.backbone, tower.stan, text.to(device).eval(), CaptionTokenizer(77),
                     MugConfig(mode="frame-token"), visual.to(device=device, dtype=dtype), "random text tower")


def build(args):
    if args.size == "demo":
        from mugstan_chat.llava.loader import load_chat_model

        return load_chat_model(demo=True, device=args.device), (32, 2, 16)
    from .chat import build_llava_7b_shape

    dtype = "fp32" if args.device == "cpu" else "bf16"
    return build_llava_7b_shape(args.device, dtype, 4096, size=args.size), (768, 12, 768)


def measure(chat_model, retriever, video: Path, candidates: int, args) -> dict:
    from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
    from mugstan_chat.engine.engine import Engine
    from mugstan_chat.engine.feature_cache import FeatureCache

    shortlist = args.shortlist if args.shortlist and args.select <= args.shortlist < candidates else None
    engine = Engine(chat_model, retriever=retriever)
    session = ChatSession(engine, video, frames=args.frames, select=args.select, candidates=candidates,
                          shortlist=shortlist, generation=GenerationSettings(max_new_tokens=1),
                          feature_cache=FeatureCache(2**30), prepare=False)
    calls = chat_model.tower.calls
    frames_before = retriever.frames_encoded
    started = time.perf_counter()
    session.prepare()  # the M candidates: decode + tower to its last layer (one frame each with --shortlist)
    embed_s = time.perf_counter() - started
    first = session.select_clips(QUESTIONS[0])  # rank (+ the shortlist in full) + encode the K chosen for the chat
    first_s = time.perf_counter() - started
    first_frames = retriever.frames_encoded - frames_before
    chat_encode_ms = session.video_features.decode_ms + session.video_features.encode_ms
    followups = []  # the candidates come from the cache; a changed choice encodes its clips for the chat
    for question in QUESTIONS[1:]:
        followups.append(session.select_clips(question).rank_ms)
    candidates_data = session.candidate_embeddings
    tokens = session.tokens_per_image
    return {
        "candidates": candidates, "frames": args.frames, "select": args.select, "shortlist": shortlist,
        "first_question_tower_frames": first_frames, "first_question_s": round(first_s, 2),
        "decode_ms": round(candidates_data.decode_ms, 1), "embed_ms": round(candidates_data.encode_ms, 1),
        "candidates_total_ms": round(embed_s * 1000, 1),
        "first_rank_ms": round(first.rank_ms, 1), "followup_rank_ms": round(statistics.median(followups), 1),
        "chosen_encode_ms": round(chat_encode_ms, 1), "followup_chat_encodes": chat_model.tower.calls - calls - 1,
        "tokens_shown": args.select * tokens, "tokens_all_candidates": candidates * tokens,
        "tokens_saved": first.tokens_saved,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mugstan-chat bench selection", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "7b", "demo"), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--frames", type=int, default=2, help="T per candidate clip")
    parser.add_argument("--select", type=int, default=4, help="K clips shown")
    parser.add_argument("--seconds", type=int, default=1800, help="length of the synthetic video")
    parser.add_argument("--shortlist", type=int, default=None,
                        help="S: the coarse pass (one frame per candidate, then S in full), where K <= S < M")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chat_model, text_shape = build(args)
    retriever = random_retriever(chat_model, *text_shape)
    with tempfile.TemporaryDirectory() as folder:
        video = write_long_video(Path(folder) / "long.mp4", args.seconds)
        rows = []
        for m in args.candidates:
            rows.append(measure(chat_model, retriever, video, m, args))
            print(markdown_table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["candidates", "frames", "select", "shortlist", "first_question_tower_frames", "first_question_s",
               "decode_ms", "embed_ms", "first_rank_ms", "followup_rank_ms",
               "chosen_encode_ms", "tokens_shown", "tokens_all_candidates", "tokens_saved"]
    print(markdown_table(rows, columns))
    write_json(args.out, {"machine": machine_description(args.device), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
