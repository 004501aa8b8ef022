"""Smoke tests of the benchmarks (mugstan_chat.benchmarks, mugstan_train.benchmarks) at tiny settings.

CPU only, no network; each benchmark's ``main([...])`` runs end to end into tmp_path and its JSON
is checked for the documented fields.
"""

import json
import math

import pytest

from mugstan_chat.entrypoints import cli
from mugstan_chat.benchmarks import batch as benchmark_batch
from mugstan_chat.benchmarks import chat as benchmark_chat
from mugstan_chat.benchmarks import selection as benchmark_selection
from mugstan_chat.entrypoints.bench import BENCHMARKS
from mugstan_train.benchmarks import train as benchmark_train


def test_bench_command_lists_every_benchmark_and_hands_over_its_arguments(capsys):
    """``mugstan-chat bench --help`` names each one; ``bench NAME ARGS`` is that module's own ``main(ARGS)``."""
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "--help"])
    listing = capsys.readouterr().out
    assert done.value.code == 0 and all(f"\n  {name} " in listing for name in BENCHMARKS)
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "video", "--help"])  # the video benchmark's own parser answers
    assert done.value.code == 0 and "usage: mugstan-chat bench video" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "precision", "--runs", "1"])  # its own usage error (neither --model nor --demo)
    assert done.value.code == 2 and "mugstan-chat bench precision: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "no-such-benchmark"])
    assert done.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_train_benchmark_smoke(tmp_path):
    out = tmp_path / "train.json"
    assert benchmark_train.main(["--shape", "tiny", "--batch", "2", "--frames", "2", "--runs", "1",
                                 "--mug-batches", "2", "4", "--methods", "clip-mean", "stan+mug",
                                 "--no-checkpointing-variant", "--out", str(out), "--plot"]) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["steps"]] == ["clip-mean", "stan+mug"]
    for row in result["steps"]:
        assert {"shape", "checkpointing", "batch", "frames", "step_ms", "clips_per_s", "peak_mb", "memory_kind",
                "vs_clip"} <= set(row)
        assert row["step_ms"] > 0 and row["batch"] == 2 and row["frames"] == 2 and not row["checkpointing"]
    assert result["steps"][0]["vs_clip"] == 1.0
    assert result["stan_mug_vs_clip"] == result["steps"][1]["vs_clip"]
    assert [r["batch"] for r in result["mug"]] == [2, 4] and all(r["score_matrix_ms"] > 0 for r in result["mug"])
    assert (tmp_path / "train_train.png").stat().st_size > 0


def test_chat_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "chat.json"
    assert benchmark_chat.main(["--demo", "--device", "cpu", "--frames", "2", "4", "--runs", "1", "--warmup", "0",
                                "--new-tokens", "4", "--video-seconds", "1", "--video-height", "144",
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--plot"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["frames"]): r for r in result["rows"]}
    assert set(rows) == {("image", 1)} | {(m, t) for m in ("stan", "mean", "concat") for t in (2, 4)}
    keys = {"decode_ms", "encode_ms", "prompt_tokens", "visual_tokens", "ttft_ms", "ttft_e2e_ms", "decode_tok_s",
            "new_tokens", "peak_mb", "memory_kind", "followup_ttft_ms", "followup_prompt_tokens",
            "text_only_ttft_ms", "followup_vs_text", "followup_tower_calls", "over_real_context",
            "encode_gflop", "prefill_gflop", "encode_floor_ms", "ttft_floor_ms", "decode_floor_tok_s"}
    for row in rows.values():
        assert keys <= set(row), keys - set(row)
        assert row["new_tokens"] == 4  # fixed answer length in every mode
        assert row["followup_tower_calls"] == 0  # the follow-up reuses cached features
        assert row["followup_prompt_tokens"] > row["prompt_tokens"]
        assert 0 < row["encode_ms"] < row["ttft_ms"] < row["ttft_e2e_ms"]
        assert row["decode_ms"] > 0 and row["decode_tok_s"] > 0 and row["text_only_ttft_ms"] > 0
        assert not row["over_real_context"]
    followups = result["followups"]  # 10 turns with KV reuse on and off (default --turns)
    assert [r["turn"] for r in followups] == [2, 5, 10]
    for row in followups:
        assert 0 < row["new_tokens_prefilled"] < row["prompt_tokens"]  # reuse prefilled only the new part
        assert row["ttft_reuse_ms"] > 0 and row["ttft_no_reuse_ms"] > 0 and row["text_only_ttft_ms"] > 0
    assert followups[0]["prompt_tokens"] < followups[-1]["prompt_tokens"]
    assert any(t["target"].startswith("follow-up TTFT turn 10") for t in result["targets"])
    per_image = rows[("image", 1)]["visual_tokens"]
    for t in (2, 4):  # one clip is one image's worth for STAN and mean; concat pays per frame
        assert rows[("stan", t)]["visual_tokens"] == rows[("mean", t)]["visual_tokens"] == per_image
        assert rows[("concat", t)]["visual_tokens"] == t * per_image
        assert rows[("stan", t)]["encode_gflop"] > rows[("mean", t)]["encode_gflop"]  # the branch costs work
    assert result["peaks"]["matmul_gflop_s"] > 0 and result["peaks"]["memory_gb_s"] > 0
    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == 8  # six per-configuration targets and two follow-up ones
    assert all(isinstance(t["met"], bool) and {"value", "limit", "note"} <= set(t) for t in targets.values())
    assert targets["prompt tokens of one clip == one image's, every T"]["met"]
    assert any(name.startswith("TTFT(stan) growth T=2 -> T=4") for name in targets)
    assert set(result["definitions"]) >= {"ttft_ms", "decode_tok_s", "followup_ttft_ms"}
    assert (tmp_path / "chat_ttft.png").stat().st_size > 0 and (tmp_path / "chat_encode.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| mode | frames |" in printed and "## Targets" in printed


def test_chat_benchmark_7b_shape_is_llava_1_5_7b():
    """The --size 7b model has LLaVA-1.5-7B's parameter counts (built on the meta device: no memory)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config, processor = benchmark_chat.llava_7b_shape_config(context=4096)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in
              (("language", model.model.language_model), ("clip", model.model.vision_tower),
               ("projector", model.model.multi_modal_projector), ("head", model.lm_head))}
    assert counts["language"] + counts["head"] == 6_738_939_904  # Llama-2-7B (6.74B) with vocab 32064
    assert counts["clip"] == 303_507_456 and counts["projector"] == 20_979_712  # CLIP-L/14-336, 2-layer MLP
    assert math.isclose(sum(counts.values()), 7.06e9, rel_tol=0.01)
    assert processor.image_processor.crop_size["height"] == 336 and config.vision_feature_layer == -2


def test_chat_benchmark_small_shape_is_clip_l_336_with_a_half_billion_lm():
    """--size small: LLaVA-1.5's CLIP-L/14-336 tower and projector input, a 24-layer 896-wide LM (meta device)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config, processor = benchmark_chat.llava_7b_shape_config(context=4096, size="small")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    language = sum(p.numel() for p in model.model.language_model.parameters())
    head = sum(p.numel() for p in model.lm_head.parameters())
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == 303_507_456  # CLIP-L/14-336
    assert config.text_config.num_hidden_layers == 24 and config.text_config.hidden_size == 896
    assert 0.4e9 < language + head < 0.6e9
    assert processor.image_processor.crop_size["height"] == 336


def test_selection_benchmark_smoke(tmp_path):
    """The selection benchmark on the demo model: the documented columns, and follow-ups ranked
    on cached candidates."""
    out = tmp_path / "selection.json"
    assert benchmark_selection.main(["--size", "demo", "--candidates", "4", "6", "--frames", "2", "--select", "2",
                                     "--seconds", "60", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["candidates"] for r in rows] == [4, 6]
    for row in rows:
        assert row["embed_ms"] > 0 and row["first_rank_ms"] > 0 and row["followup_rank_ms"] > 0
        assert row["tokens_saved"] == row["tokens_all_candidates"] - row["tokens_shown"] > 0
        assert row["shortlist"] is None and row["first_question_tower_frames"] == row["candidates"] * 2
    coarse = tmp_path / "coarse.json"
    assert benchmark_selection.main(["--size", "demo", "--candidates", "6", "--frames", "2", "--select", "2",
                                     "--shortlist", "3", "--seconds", "60", "--out", str(coarse)]) == 0
    (row,) = json.loads(coarse.read_text())["rows"]
    assert row["shortlist"] == 3 and row["first_question_tower_frames"] == 6 + 3 * 2  # one frame each, then S x T


def test_batch_benchmark_smoke(tmp_path):
    """The batch benchmark on the demo model, our engine only: one row per in-flight and batch-size setting."""
    out = tmp_path / "batch.json"
    assert benchmark_batch.main(["--demo", "--routes", "ours", "--in-flight", "1", "2", "--batch-size", "1", "3",
                                 "--videos", "4", "--new-tokens", "4", "--frames", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["route"], r["in_flight"], r["batch_size"], r["videos"], r["failed"]) for r in rows] == [
        ("ours", 1, 1, 4, 0), ("ours", 1, 3, 4, 0), ("ours", 2, 1, 4, 0), ("ours", 2, 3, 4, 0)]
    assert all(r["videos_s"] > 0 and r["encode_ms"] > 0 for r in rows)

# ------------------------------------------------------------------ the serving matrix (issue 30), no servers
def _matrix_plan(chat_model, users=(1, 4, 16)):
    from mugstan_chat.benchmarks import serve as benchmark_serve

    workloads = {"prefill": 32, "decode": 256}
    count = benchmark_serve.windows_needed(workloads, list(users))
    systems = benchmark_serve.cold_systems(chat_model.processor.tokenizer, count)
    return benchmark_serve, systems, benchmark_serve.plan_cells(["ours", "vllm"], workloads, list(users), systems)


def test_serve_matrix_cold_prompts_share_no_first_token(chat_model):
    serve, systems, cells = _matrix_plan(chat_model)
    tokenizer = chat_model.processor.tokenizer
    for route in ("ours", "vllm"):
        cold = [r for c in cells if c.route == route and c.cache == "cold" for r in c.requests]
        assert len({r.window for r in cold}) == len(cold) == 2 * (1 + 4 + 16)  # no video window twice
        firsts = [serve.first_token(tokenizer, r.system) for r in cold]
        assert len(set(firsts)) == len(firsts)  # every cold request, every round: its own first token
        assert tokenizer.unk_token_id not in firsts
        assert (0.0, 1.0) not in {r.window for r in cold}  # window 0 is the warm-up's
    assert serve.first_token(tokenizer, systems[0]) not in {serve.first_token(tokenizer, s) for s in systems[1:]}


def test_serve_matrix_warm_rounds_repeat_the_cold_round_with_another_question(chat_model):
    _, _, cells = _matrix_plan(chat_model)
    for cold, warm in zip(cells[0::2], cells[1::2]):
        assert (cold.cache, warm.cache) == ("cold", "warm")
        assert (cold.route, cold.workload, cold.users) == (warm.route, warm.workload, warm.users)
        assert [(r.window, r.system) for r in cold.requests] == [(r.window, r.system) for r in warm.requests]
        assert {r.question for r in cold.requests}.isdisjoint({r.question for r in warm.requests})
    ours = [(c.cache, c.workload, c.users, c.requests) for c in cells if c.route == "ours"]
    assert ours == [(c.cache, c.workload, c.users, c.requests) for c in cells if c.route == "vllm"]  # same work
    cold_only = _matrix_plan(chat_model)[0].plan_cells(["ours"], {"decode": 256}, [1, 4], _matrix_plan(chat_model)[1],
                                                        ("cold",))
    assert [(c.cache, c.users) for c in cold_only] == [("cold", 1), ("cold", 4)]


def test_serve_matrix_json_has_every_cell_with_its_cores(chat_model, tmp_path):
    """Each cell's row (from a fake server) lands in the JSON with the route's cores and threads."""
    import argparse

    serve, _, cells = _matrix_plan(chat_model, users=(1, 2))
    args = argparse.Namespace(out=str(tmp_path / "serve.json"), concurrency=[1, 2])

    def send(request, tokens):
        return {"ttft_s": 0.5, "tokens": tokens, "prompt_tokens": 100, "total_s": 1.0, "cached_features": False,
                "decode_encode_s": 0.1}

    rows = [serve.run_cell(cell, send, None) for cell in cells]
    cores = {"ours": {"our_threads_per_request": 1, "usable_cores": 2},
             "vllm": {"VLLM_CPU_OMP_THREADS_BIND": "auto", "worker_cores": [1], "reserved_cores": [0]}}
    assert serve.write(args, cells, rows[:-1], cores) == [cells[-1].label]  # a stopped run names what is missing
    assert serve.write(args, cells, rows, cores) == []
    saved = json.loads((tmp_path / "serve.json").read_text())
    got = {(c["route"], c["cache"], c["workload"], c["users"]) for c in saved["cells"]}
    assert got == {(r, c, w, u) for r in ("ours", "vllm") for c in ("cold", "warm") for w in ("prefill", "decode")
                   for u in (1, 2)}
    assert all(c["full_length"] and c["answer_tokens"] in (32, 256) for c in saved["cells"])
    assert "decode-heavy (256 tokens)" in next(c["label"] for c in saved["cells"] if c["workload"] == "decode")
    assert saved["cores"] == cores and saved["not_measured"] == []
    ratios = {(r["cache"], r["workload"], r["users"]) for r in saved["vllm_over_ours"]}
    assert ratios == {(c, w, u) for c in ("cold", "warm") for w in ("prefill", "decode") for u in (1, 2)}


def test_serve_matrix_reads_vllm_core_binding_from_its_log():
    from mugstan_chat.benchmarks import serve as benchmark_serve

    log = ("INFO OpenMP thread binding info: \n\tVLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True\n"
           "\tlocal_rank=0, core ids=[1]\n\treserved_cpus=[0]\nINFO Reducing Torch threads from 2 to 1 for serving.")
    assert benchmark_serve.vllm_binding(log) == {"worker_cores": [1], "reserved_cores": [0],
                                                 "torch_threads_reduced": ["2->1"]}


@pytest.mark.parametrize("benchmark", ["serve", "batch"])
def test_both_benchmarks_start_vllm_from_the_same_flags(benchmark, tmp_path):
    """bench serve and bench batch start vLLM through serve.start_vllm: each parser gives every flag it reads."""
    from mugstan_chat.benchmarks import serve as benchmark_serve

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    module = benchmark_serve if benchmark == "serve" else benchmark_batch
    args = module.build_parser().parse_args(["--size", "small", "--routes", "vllm", "--vllm-venv", "/venv",
                                             "--vllm-bind", "0-1", "--vllm-reserved-cpus", "0", "--enforce-eager"])
    args.concurrency = [4]  # what bench batch sets from its in-flight and batch sizes before starting vLLM
    env = benchmark_serve.vllm_cpu_env(args)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    command = benchmark_serve.vllm_command(args, tmp_path, 8123)
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in command and command[command.index("--max-num-seqs") + 1] == "4"
    assert command[command.index("--max-model-len") + 1] == "4096"
