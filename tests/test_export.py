"""`mugstan-chat export-llava`: vLLM's key layout on disk, and our loader reads the directory back unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mugstan_chat.chat import ChatSession, GenerationSettings
from mugstan_chat.cli import main as cli_main
from mugstan_chat.demo import build_demo_llava
from mugstan_chat.export import vllm_key
from mugstan_chat.loader import load_chat_model

VIDEO = Path(__file__).resolve().parents[1] / "examples" / "red_triangle_growing.mp4"


def test_export_writes_vllm_layout_and_loads_back_as_the_same_model(tmp_path, capsys):
    assert cli_main(["export-llava", str(tmp_path / "llava"), "--demo"]) == 0
    assert "--enable-mm-embeds" in capsys.readouterr().out
    with safe_open(tmp_path / "llava" / "model.safetensors", "pt") as stored:
        keys = set(stored.keys())
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    assert prefixes == {"language_model.model", "language_model.lm_head", "multi_modal_projector.linear_1",
                        "multi_modal_projector.linear_2", "vision_tower.vision_model"}  # what vLLM's LLaVA maps
    source, _ = build_demo_llava()
    assert keys == {vllm_key(k) for k in source.state_dict()}
    assert (tmp_path / "llava" / "chat_template.jinja").exists() and (tmp_path / "llava" / "stan").is_dir()
    exported = load_chat_model(str(tmp_path / "llava"), stan=str(tmp_path / "llava" / "stan"), device="cpu",
                               dtype="fp32", frames=4)
    demo = load_chat_model(demo=True, device="cpu", frames=4)
    ours, theirs = demo.model.state_dict(), exported.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert exported.model.config.text_config.num_attention_heads == 2  # head_dim 32: what vLLM's kernels need
    answers = [ChatSession(m, VIDEO, generation=GenerationSettings(max_new_tokens=8)).ask("what happens ?")
               for m in (demo, exported)]
    assert answers[0] == answers[1]  # the same weights; only the attention's head split differs
