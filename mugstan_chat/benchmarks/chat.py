"""Video-chat cost of the three ways to give LLaVA-1.5 a video: STAN tower, temporal mean, frame concatenation.

For T frames of one clip (default 8, 16, 32) and each way of feeding the video:

* ``stan``: our video tower, L+1 tokens per clip (one image's worth), STAN fused at layer -2;
* ``mean``: the same tower with the branch off (temporal mean of CLIP features, same tokens);
* ``concat``: stock LLaVA with every frame as its own image (T x one image's tokens, T
  ``<image>`` entries; the training-free frame-concatenation baseline). The session decodes the
  T frames of the clip and gives each to the tower as a one-frame clip, which is exactly the
  tower's image path (plain CLIP per frame); the modes are defined in mugstan_chat.evaluation.modes;
* ``image`` (reference, T=1): one frame as one image, stock LLaVA image chat. Its prompt has
  the same length as a ``stan``/``mean`` prompt, so it is the equal-length decoding reference.

it measures, through the chat engine (:class:`mugstan_chat.engine.conversation.ChatSession`), on a generated
720p H.264 clip: video decode ms, tower encode ms (tower + projector), prompt tokens, time to
first token, decode tokens/s over a fixed number of new tokens, peak memory, and the follow-up
turn's time to first token (cached features) next to a text-only turn of the same prompt length.
Warm-up first, then medians of ``--runs``; all modes in one process on the same video.

    mugstan-chat bench chat --demo --out runs/bench/chat_demo.json --plot     # CPU, tiny model
    mugstan-chat bench chat --size 7b --out runs/bench/chat_7b.json --plot    # GPU, random 7B
    mugstan-chat bench chat --size small --device cpu --modes stan --frames 8 --runs 2   # CPU, 0.5B LM
    mugstan-chat bench chat --model llava-hf/llava-1.5-7b-hf --stan BRANCH_DIR --out chat.json

``--size 7b`` builds LLaVA-1.5-7B's shapes (Llama-2-7B, CLIP-L/14-336, 2-layer MLP projector)
plus a random STAN branch straight on the GPU in bf16, with random weights: no download. ``--size small``
keeps that tower and projector with a 0.47 B language model (24 layers, 896 wide); on a CPU in bf16 where it computes bf16 natively, else fp32.
The follow-up table (:mod:`mugstan_chat.benchmarks.followups`) times turns 2, 5 and 10 of one conversation with
conversation KV reuse on and off.
Timing definitions (also in the JSON under ``definitions``) are in :data:`DEFINITIONS`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

from mugstan_chat.llava import shapes
from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.evaluation.modes import MODES, session_shape  # (the library's three modes)
from mugstan_chat.llava.loader import ChatModel, ChatSettings, load_chat_model
from mugstan_chat.engine.turns import StopOnEvent, TimedStreamer  # the chat engine's own streamer and stop criterion
from mugstan_chat.engine.engine import Engine

from . import common
from .followups import FOLLOWUP_COLUMNS, followup_targets, followup_turns

QUESTION = "what happens in the video ?"
FOLLOW_UP = "what happens after that ?"
FILLER = "tell me what happens in the video and describe the scene".split()
DEFINITIONS = {
    "decode_ms": "open the video, decode the T sampled frames, CLIP preprocessing (CPU)",
    "encode_ms": "video tower (+ STAN) + projector on the decoded frames, synchronised",
    "ttft_ms": "decoded frames -> first answer token: encode + prompt + prefill (decode excluded: "
               "it is the same T frames for every mode)",
    "ttft_e2e_ms": "question on a fresh video -> first answer token (decode + encode + prefill)",
    "decode_tok_s": "(new tokens - 1) / (last token time - first token time), fixed answer length",
    "followup_ttft_ms": "second question -> first token, video features from the session cache, KV reuse off "
                        "(the whole prompt prefilled; the follow-up table has reuse on and off)",
    "text_only_ttft_ms": "text-only prompt of the follow-up's length -> first token, same harness",
    "peak_mb": "CUDA max allocated (weights included) or CPU RSS growth, one extra first turn",
}


# ---------------------------------------------------------------------------------------- models
TEXT_SHAPES = shapes.TEXT_SHAPES  # text models by --size: Llama-2-7B (LLaVA-1.5-7B's) and a ~0.5 B one


def llava_7b_shape_config(context: int = 4096, size: str = "7b"):
    """(LlavaConfig, processor) of LLaVA-1.5-7B's architecture (:func:`mugstan_chat.llava.shapes.llava_shape_config`)."""
    return shapes.llava_shape_config(context, size)


def build_llava_7b_shape(device: str = "cuda", dtype: str = "bf16", context: int = 4096, seed: int = 0,
                         size: str = "7b") -> ChatModel:
    """LLaVA-1.5-7B's architecture (:func:`llava_7b_shape_config`) with random weights on ``device``,
    plus a random K=4 STAN branch fused at layer -2 (what LLaVA reads), video tower installed.

    Building under ``torch.device(device)`` never materialises the 14 GB of weights in CPU memory.
    """
    from mugstan_chat.model.backbone import HFCLIPVision
    from mugstan_chat.llava.tower import install_video_tower
    from mugstan_chat.llava.loader import DTYPES
    from mugstan_chat.model.stan import STAN, StanConfig

    torch_dtype = DTYPES[dtype]
    model, processor = shapes.build_random_llava(size, device, torch_dtype, context, seed)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed + 1)
        stan = STAN(HFCLIPVision(model.model.vision_tower), StanConfig(fuse_layer=-2, drop_path=0.0))
    tower = install_video_tower(model, stan.to(device=device, dtype=torch_dtype), mode="stan")
    model.eval()
    name = "llava-1.5-7b shape" if size == "7b" else "CLIP-L/14-336 + 0.5B LM shape"
    settings = ChatSettings(model=f"{name} (random weights)", temporal="stan", stan="random",
                            frames=8, clips=1, device=device, dtype=dtype, quantization=None, demo=False)
    return ChatModel(model=model, processor=processor, tower=tower, settings=settings,
                     notices=[f"random weights at {name}: timings only"])


def load_model(args) -> ChatModel:
    """The model under test: demo, random 7B shape, or real weights through the one loader."""
    if args.size == "7b":
        return build_llava_7b_shape(args.device, args.dtype if args.dtype != "auto" else "bf16", args.context)
    if args.size == "small":
        from mugstan_chat.llava.loader import resolve_dtype  # auto: bf16 on GPUs and on CPUs with native bf16

        default = resolve_dtype("auto", args.device.split(":")[0])
        return build_llava_7b_shape(args.device, args.dtype if args.dtype != "auto" else default, args.context,
                                    size="small")
    if args.demo or args.model is None:
        return load_chat_model(demo=True, device=args.device, dtype=args.dtype)
    return load_chat_model(args.model, stan=args.stan, temporal="stan" if args.stan else "mean",
                           device=args.device, dtype=args.dtype)


# ---------------------------------------------------------------------------------------- inputs
def benchmark_video(cache_dir: str, seconds: int, height: int, fps: int = 30) -> Path:
    """A 16:9 H.264 clip (moving gradient + box), written once with PyAV into ``cache_dir``."""
    from .video import make_benchmark_video  # the video benchmark's generator (writing goes through mugstan_chat.video)

    width = 2 * round(height * 16 / 9 / 2)
    path = Path(cache_dir) / f"bench_{width}x{height}_{seconds}s_{fps}fps.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_benchmark_video(path, width, height, seconds, fps)
    return path


@dataclass
class FixedLength(GenerationSettings):
    """Greedy decoding of exactly ``max_new_tokens`` tokens (min = max), so every mode decodes as much."""

    def generate_kwargs(self) -> dict:
        return {**super().generate_kwargs(), "min_new_tokens": self.max_new_tokens}


def session_for(chat_model: ChatModel, video: Path, mode: str, frames: int, new_tokens: int,
                reuse_cache: bool = True) -> ChatSession:
    """A fresh, unprepared session feeding the video the way ``mode`` does ("image": T=1 reference)."""
    generation = FixedLength(max_new_tokens=new_tokens)
    # "image" is concat of T=1: one frame as one image through the tower's image path
    shape = session_shape("concat" if mode == "image" else mode, frames)
    return ChatSession(Engine(chat_model), video, frames=shape.frames, clips=shape.clips, temporal=shape.temporal,
                       frames_as_images=shape.frames_as_images, generation=generation, prepare=False,
                       reuse_cache=reuse_cache)


# ---------------------------------------------------------------------------------------- timing
def _stream(session: ChatSession, question: str):
    for _ in session.ask_stream(question):
        pass
    return session.last_stats


def conversation(chat_model: ChatModel, video: Path, mode: str, frames: int, new_tokens: int) -> dict:
    """One fresh session: first question (decode + encode + prefill + answer), then a follow-up."""
    session = session_for(chat_model, video, mode, frames, new_tokens, reuse_cache=False)
    first = _stream(session, QUESTION)
    calls = chat_model.tower.calls
    second = _stream(session, FOLLOW_UP)
    decode_s = (first.total_ms - first.first_token_ms) / 1000
    return {
        "decode_ms": first.decode_ms, "encode_ms": first.encode_ms,
        "ttft_ms": first.first_token_ms - first.decode_ms, "ttft_e2e_ms": first.first_token_ms,
        "decode_tok_s": (first.new_tokens - 1) / decode_s if first.new_tokens > 1 and decode_s > 0 else float("nan"),
        "new_tokens": first.new_tokens, "prompt_tokens": first.prompt_tokens, "visual_tokens": first.visual_tokens,
        "followup_ttft_ms": second.first_token_ms, "followup_prompt_tokens": second.prompt_tokens,
        "followup_tower_calls": chat_model.tower.calls - calls,
    }


def text_only_ttft(chat_model: ChatModel, prompt_tokens: int) -> float:
    """Question -> first token for a text-only prompt of exactly ``prompt_tokens`` tokens.

    Mirrors a streamed chat turn step by step (chat template, tokenisation, ``generate`` in a
    thread with a stop criterion, a text streamer consumed here); only the visual features are
    missing, which is what the follow-up comparison isolates.
    """
    processor, model = chat_model.processor, chat_model.model
    tokenizer = processor.tokenizer
    words = FILLER * math.ceil(prompt_tokens / len(FILLER) + 1)
    started = time.perf_counter()
    messages = [{"role": "user", "content": [{"type": "text", "text": " ".join(words)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < prompt_tokens:
        raise ValueError(f"filler text gave {ids.shape[1]} tokens, fewer than {prompt_tokens}")
    ids = ids[:, :prompt_tokens].to(chat_model.device)  # (1, P)
    streamer = TimedStreamer.create(tokenizer, started)
    stop = threading.Event()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                  pad_token_id=tokenizer.pad_token_id, **FixedLength(max_new_tokens=2).generate_kwargs())

    def run():
        with torch.inference_mode():
            model.generate(**kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for _ in streamer:  # consumed here, as a chat turn's text is
        pass
    stop.set()
    thread.join()
    return (streamer.first_token_at - started) * 1000


def peak_first_turn(chat_model: ChatModel, video: Path, mode: str, frames: int, new_tokens: int) -> dict:
    """Peak memory of one fresh first turn (a separate run: the CPU sampler would perturb timings)."""
    device = str(chat_model.device)
    before = torch.cuda.memory_allocated() if chat_model.device.type == "cuda" else 0
    with common.peak_memory(device) as memory:
        _stream(session_for(chat_model, video, mode, frames, new_tokens), QUESTION)
    out = {"peak_mb": memory["mb"], "memory_kind": memory["kind"]}
    if chat_model.device.type == "cuda":
        out["peak_over_weights_mb"] = memory["mb"] - before / 2**20
    return out


TIME_KEYS = ("decode_ms", "encode_ms", "ttft_ms", "ttft_e2e_ms", "followup_ttft_ms", "text_only_ttft_ms")


def bench_configs(chat_model: ChatModel, video: Path, configs: list[tuple[str, int]], args) -> list[dict]:
    """Medians (and bests) over ``args.runs`` rounds after ``args.warmup`` untimed ones.

    Each round runs every configuration once, so load from other processes on a shared
    machine falls on all configurations alike instead of on whichever ran during a burst.
    """
    samples: dict[tuple[str, int], list[dict]] = {config: [] for config in configs}
    for round_ in range(args.warmup + args.runs):
        for mode, frames in configs:
            run = conversation(chat_model, video, mode, frames, args.new_tokens)
            run["text_only_ttft_ms"] = text_only_ttft(chat_model, run["followup_prompt_tokens"])
            if round_ >= args.warmup:
                samples[(mode, frames)].append(run)
    rows = []
    for (mode, frames), runs in samples.items():
        row = {"mode": mode, "frames": frames}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        for key in ("prompt_tokens", "visual_tokens", "followup_prompt_tokens", "new_tokens", "followup_tower_calls"):
            row[key] = int(row[key])
        for key in TIME_KEYS:  # best of N: the floor of a noisy shared machine
            row[key.replace("_ms", "_best_ms")] = min(r[key] for r in runs)
        row["decode_tok_s_best"] = max(r["decode_tok_s"] for r in runs)
        row["ttft_runs_ms"] = [r["ttft_ms"] for r in runs]
        row["followup_vs_text"] = row["followup_ttft_ms"] / row["text_only_ttft_ms"]
        row["followup_vs_text_best"] = row["followup_ttft_best_ms"] / row["text_only_ttft_best_ms"]
        if not args.no_peak:
            row.update(peak_first_turn(chat_model, video, mode, frames, args.new_tokens))
        row["over_real_context"] = row["prompt_tokens"] + args.new_tokens > args.real_context
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- floors
def measure_peaks(device: str, dtype: torch.dtype, size: int = 2048, copy_mb: int = 256) -> dict:
    """Measured matmul rate (best of a few square matmuls) and memory bandwidth (read + write of a copy)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_ms = common.median_ms(lambda: torch.matmul(a, b), runs=5, warmup=2, device=device)
    src = torch.empty(copy_mb * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = common.median_ms(lambda: dst.copy_(src), runs=5, warmup=2, device=device)
    return {"matmul_gflop_s": 2 * size**3 / (matmul_ms / 1000) / 1e9, "matmul_size": size,
            "matmul_dtype": str(dtype).replace("torch.", ""),
            "memory_gb_s": 2 * src.numel() * 4 / (copy_ms / 1000) / 1e9, "copy_mb": copy_mb}


def count_flops(fn) -> float:
    """FLOPs of ``fn()`` as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return float(counter.get_total_flops())


def work_of(chat_model: ChatModel, video: Path, mode: str, frames: int) -> dict:
    """FLOPs of encode and prefill, and the bytes one decode step must read (weights + KV cache)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from mugstan_chat.video import load_video_clips

    model, tower = chat_model.model, chat_model.tower
    session = session_for(chat_model, video, mode, frames, 1)
    clips = load_video_clips(video, frames_per_clip=session.frames, num_clips=session.clips, mode="eval",
                             image_processor=chat_model.processor.image_processor).clips  # (C, T, 3, H, W)
    if session.frames_as_images:  # concat: every frame one image, as the session encodes them
        clips = clips.flatten(0, 1)[:, None]  # (C*T, 1, 3, H, W)
    pixels = clips.to(device=tower.device, dtype=tower.dtype)
    encode = count_flops(lambda: model.model.get_image_features(pixel_values=pixels, temporal_mode=session.temporal))
    session.prepare()
    inputs = {k: v.to(tower.device) for k, v in session.build_prompt(QUESTION).items()}
    cached = {"image": BaseModelOutputWithPooling(pooler_output=session.features)}
    prefill = count_flops(lambda: model(**inputs, mm_encoder_outputs=cached, logits_to_keep=1))
    text = model.config.text_config
    language = model.model.language_model
    element = next(language.parameters()).element_size()
    weights = sum(p.numel() for p in language.parameters()) - language.embed_tokens.weight.numel()
    weights += model.lm_head.weight.numel()  # the embedding table is gathered, the head read whole
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element
    prompt = inputs["input_ids"].shape[1]
    return {"encode_gflop": encode / 1e9, "prefill_gflop": prefill / 1e9,
            "decode_step_mb": (weights * element + kv_per_token * prompt) / 2**20}


def add_floors(row: dict, work: dict, peaks: dict) -> None:
    """Physical floors: FLOPs / measured matmul rate; decode bytes / measured bandwidth."""
    rate = peaks["matmul_gflop_s"]
    row.update(work)
    row["encode_floor_ms"] = work["encode_gflop"] / rate * 1000
    row["prefill_floor_ms"] = work["prefill_gflop"] / rate * 1000
    row["ttft_floor_ms"] = row["encode_floor_ms"] + row["prefill_floor_ms"]
    row["decode_floor_tok_s"] = peaks["memory_gb_s"] * 1e9 / (work["decode_step_mb"] * 2**20)


# ---------------------------------------------------------------------------------------- targets
def _target(name: str, value, limit: str, met: bool | None, note: str = "", best=None) -> dict:
    return {"target": name, "value": value, "limit": limit, "met": met, "note": note, "value_best_of_runs": best}


def evaluate_targets(rows: list[dict], on_gpu: bool) -> list[dict]:
    """The issue's targets, met / not met on medians, with the best-of-runs value beside each."""
    by = {(r["mode"], r["frames"]): r for r in rows}
    frames = sorted({r["frames"] for r in rows if r["mode"] in MODES})
    mid = 16 if 16 in frames else frames[len(frames) // 2]
    lo, hi = (8, 32) if {8, 32} <= set(frames) else (frames[0], frames[-1])
    scope = "" if on_gpu else "CPU demo figure; the target is for 7B on a GPU"

    def ratio(a, b, key):
        return by[a][key] / by[b][key], by[a][key.replace("_ms", "_best_ms")] / by[b][key.replace("_ms", "_best_ms")]

    targets = []
    image = by.get(("image", 1))
    if image:
        tokens = {f"{m} T={t}": by[(m, t)]["prompt_tokens"] for m in ("stan", "mean") for t in frames if (m, t) in by}
        equal = all(v == image["prompt_tokens"] for v in tokens.values())
        targets.append(_target("prompt tokens of one clip == one image's, every T", tokens,
                               f"== {image['prompt_tokens']}", equal))
    if ("stan", mid) in by and ("concat", mid) in by:
        value, best = ratio(("stan", mid), ("concat", mid), "ttft_ms")
        targets.append(_target(f"TTFT(stan, T={mid}) <= 0.25 x TTFT(concat, T={mid})", value, "<= 0.25",
                               value <= 0.25, scope, best))
    if ("stan", lo) in by and ("stan", hi) in by and lo != hi:
        value, best = ratio(("stan", hi), ("stan", lo), "ttft_ms")
        targets.append(_target(f"TTFT(stan) growth T={lo} -> T={hi}", value, "<= 1.5", value <= 1.5, scope, best))
    worst = max(rows, key=lambda r: r["followup_vs_text"])
    targets.append(_target(
        "follow-up TTFT <= 1.1 x text-only turn of equal length (worst row)", worst["followup_vs_text"], "<= 1.1",
        worst["followup_vs_text"] <= 1.1,
        "all rows: " + ", ".join(f"{r['mode']} T={r['frames']} {r['followup_vs_text']:.2f}" for r in rows),
        max(r["followup_vs_text_best"] for r in rows)))
    if ("stan", mid) in by and ("mean", mid) in by:
        value, best = ratio(("stan", mid), ("mean", mid), "encode_ms")
        targets.append(_target(f"tower time stan/mean at T={mid}", value, "<= 1.35", value <= 1.35, "", best))
    stan = [r for r in rows if r["mode"] == "stan"]
    if image and stan:
        value = min(r["decode_tok_s"] for r in stan) / image["decode_tok_s"]
        best = min(r["decode_tok_s_best"] for r in stan) / image["decode_tok_s_best"]
        targets.append(_target("decode tok/s stan >= 0.9 x concat at equal prompt length (worst T)", value, ">= 0.9",
                               value >= 0.9, "equal length: concat of one frame (= one image) has stan's prompt "
                               "length; concat at the same T has a longer prompt (see rows)", best))
    return targets


# ---------------------------------------------------------------------------------------- output
COLUMNS = ["mode", "frames", "prompt_tokens", "decode_ms", "encode_ms", "ttft_ms", "ttft_e2e_ms", "decode_tok_s",
           "peak_mb", "followup_ttft_ms", "text_only_ttft_ms", "followup_vs_text"]
FLOOR_COLUMNS = ["mode", "frames", "encode_gflop", "encode_ms", "encode_floor_ms", "prefill_gflop", "ttft_ms",
                 "ttft_floor_ms", "decode_step_mb", "decode_tok_s", "decode_floor_tok_s"]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mugstan-chat bench chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--demo", action="store_true", help="tiny random demo model (CPU; the default)")
    which.add_argument("--size", choices=list(TEXT_SHAPES),
                       help="random weights: 7b = LLaVA-1.5-7B's shape (GPU); small = its CLIP-L/14-336 tower with "
                            "a 0.5 B language model (CPU)")
    which.add_argument("--model", help="real LLaVA weights (hub id or directory) through the loader")
    parser.add_argument("--stan", help="STAN branch for --model (without it only mean/concat run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (one conversation per configuration)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--new-tokens", type=int, default=32, help="answer length (min = max new tokens)")
    parser.add_argument("--context", type=int, default=20480,
                        help="--size 7b: text context, room for concatenation's long prompts")
    parser.add_argument("--real-context", type=int, default=None,
                        help="rows whose prompt + answer exceed this are flagged (default: the model's; 4096 for 7b)")
    parser.add_argument("--video-seconds", type=int, default=10)
    parser.add_argument("--video-height", type=int, default=720)
    parser.add_argument("--cache-dir", default=str(common.REPO_ROOT / "runs" / "bench" / "cache"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 steadies a tiny model on a loaded machine; default: torch's)")
    parser.add_argument("--no-floors", action="store_true", help="skip FLOP counting and the peak-rate test")
    parser.add_argument("--no-peak", action="store_true", help="skip the extra first turn that measures peak memory")
    parser.add_argument("--turns", type=int, default=10,
                        help="conversation length for the follow-up table, KV reuse on/off (0: skip it)")
    parser.add_argument("--followup-frames", type=int, default=None, help="T for the follow-up table "
                        "(default: the first --frames)")
    parser.add_argument("--followup-new-tokens", type=int, default=8, help="answer length in the follow-up table")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--plot", action="store_true", help="write PNG plots next to --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    video = benchmark_video(args.cache_dir, args.video_seconds, args.video_height)
    chat_model = load_model(args)
    if args.real_context is None:
        args.real_context = 4096 if args.size == "7b" else chat_model.context_length
    if chat_model.context_length < args.context and args.model:  # time concatenation past the real context
        chat_model.model.config.text_config.max_position_embeddings = args.context
    modes = [m for m in args.modes if m in chat_model.tower.available_modes or m == "concat"]
    skipped = sorted(set(args.modes) - set(modes))
    configs = [("image", 1)] + [(m, t) for t in args.frames for m in modes]
    rows = bench_configs(chat_model, video, configs, args)
    device = str(chat_model.device)
    peaks = None
    if not args.no_floors:
        big = chat_model.device.type == "cuda"  # a GPU needs bigger operands to reach its peak
        peaks = measure_peaks(device, chat_model.tower.dtype, size=8192 if big else 2048, copy_mb=2048 if big else 256)
        for row in rows:
            add_floors(row, work_of(chat_model, video, row["mode"], row["frames"]), peaks)
    targets = evaluate_targets(rows, chat_model.device.type == "cuda")
    followups = []
    if args.turns > 0:
        followups = followup_turns(
            chat_model, video, args.followup_frames or args.frames[0], args.followup_new_tokens, args.turns,
            args.runs, args.warmup, session_for, _stream, text_only_ttft)
        targets += followup_targets(followups)
    machine = common.machine_description(device)
    print(f"## Video chat, {chat_model.settings.model}, {chat_model.settings.dtype} ({machine}, "
          f"{torch.get_num_threads()} torch threads; {args.runs} runs, {args.new_tokens} new tokens)\n")
    print(common.markdown_table(rows, COLUMNS))
    if peaks:
        print(f"\n## Work and floors (matmul {peaks['matmul_gflop_s']:.0f} GFLOP/s, memory "
              f"{peaks['memory_gb_s']:.1f} GB/s measured)\n")
        print(common.markdown_table(rows, FLOOR_COLUMNS))
    if followups:
        print(f"\n## Follow-ups over {args.turns} turns, KV reuse on / off (T={args.followup_frames or args.frames[0]}, "
              f"{args.followup_new_tokens} new tokens per answer; text-only: no history, as many tokens as the "
              "reused turn prefilled)\n")
        print(common.markdown_table(followups, FOLLOWUP_COLUMNS))
    print("\n## Targets\n")
    for t in targets:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        value = f"{t['value']:.3g}" if isinstance(t["value"], float) else t["value"]
        best = f"; best of runs {t['value_best_of_runs']:.3g}" if t["value_best_of_runs"] is not None else ""
        print(f"- {t['target']}: {value} ({t['limit']}) -> {verdict}{best}" + (f"  [{t['note']}]" if t["note"] else ""))
    if skipped:
        print(f"\nskipped modes (no STAN branch loaded): {', '.join(skipped)}")
    payload = {"machine": machine, "torch_threads": torch.get_num_threads(), "load_average": _load_average(),
               "model": chat_model.settings.model, "dtype": chat_model.settings.dtype,
               "device": device, "args": vars(args), "video": {"path": str(video), "bytes": video.stat().st_size},
               "definitions": DEFINITIONS, "peaks": peaks, "rows": rows, "followups": followups, "targets": targets, "skipped_modes": skipped,
               "wall_s": time.perf_counter() - started}
    common.write_json(args.out, payload)
    if args.plot and args.out:
        _plot(rows, Path(args.out).with_suffix(""))
    return 0


def _load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _plot(rows: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (("ttft_ms", "time to first token, ms (encode + prefill)", "ttft"),
                             ("encode_ms", "tower encode, ms", "encode")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode in MODES:
            points = sorted((r["frames"], r[key]) for r in rows if r["mode"] == mode)
            if points:
                ax.plot(*zip(*points), marker="o", label=mode)
        ax.set_xlabel("frames T (one clip)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{stem}_{name}.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
