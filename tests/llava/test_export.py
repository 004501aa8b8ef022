"""`mugstan-chat export-llava`: vLLM's key layout on disk, and our loader reads the directory back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mugstan_chat.llava import export

from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.llava.chat_template import (IN_ORDER_TEMPLATE_FILE, TemplateMismatch, check_in_order_template,
                                        in_order_template, render_prompt)
from mugstan_chat.entrypoints.cli import main as cli_main
from mugstan_chat.llava.demo import build_demo_llava, build_demo_processor
from mugstan_chat.llava.export import vllm_key
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.engine.engine import Engine

VIDEO = Path(__file__).resolve().parents[2] / "examples" / "red_triangle_growing.mp4"


def test_export_writes_vllm_layout_and_loads_back_as_the_same_model(tmp_path, capsys):
    assert cli_main(["export-llava", str(tmp_path / "llava"), "--demo"]) == 0
    out = capsys.readouterr().out
    assert "--enable-mm-embeds" in out and "--chat-template-content-format openai" in out
    assert f"--chat-template {tmp_path / 'llava' / IN_ORDER_TEMPLATE_FILE}" in out
    with safe_open(tmp_path / "llava" / "model.safetensors", "pt") as stored:
        keys = set(stored.keys())
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    assert prefixes == {"language_model.model", "language_model.lm_head", "multi_modal_projector.linear_1",
                        "multi_modal_projector.linear_2", "vision_tower.vision_model"}  # what vLLM's LLaVA maps
    source, _ = build_demo_llava()
    assert keys == {vllm_key(k) for k in source.state_dict()}
    assert (tmp_path / "llava" / "chat_template.jinja").exists() and (tmp_path / "llava" / "stan").is_dir()
    assert (tmp_path / "llava" / IN_ORDER_TEMPLATE_FILE).read_text().startswith("{#- Written by mugstan-chat")
    exported = load_chat_model(str(tmp_path / "llava"), stan=str(tmp_path / "llava" / "stan"), device="cpu",
                               dtype="fp32", frames=4)
    demo = load_chat_model(demo=True, device="cpu", frames=4)
    ours, theirs = demo.model.state_dict(), exported.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert exported.model.config.text_config.num_attention_heads == 2  # head_dim 32: what vLLM's kernels need
    answers = [ChatSession(Engine(m), VIDEO, generation=GenerationSettings(max_new_tokens=8)).ask("what happens ?")
               for m in (demo, exported)]
    assert answers[0] == answers[1]  # the same weights; only the attention's head split differs


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Building the model is what a refused export must not reach."""
    def forbidden(args):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr(export, "build_source", forbidden)


def test_export_refuses_a_folder_that_is_not_empty_before_building(tmp_path, capsys, no_model):
    taken = tmp_path / "llava"
    taken.mkdir()
    (taken / "config.json").write_text('{"mine": true}')
    (tmp_path / "file").write_text("x")
    for target, needle in [(taken, "is not empty; pass --overwrite"),
                           (tmp_path / "file", "exists and is not a folder")]:
        assert cli_main(["export-llava", str(target), "--demo"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert err.startswith(f"mugstan-chat export-llava: error: DIR {target} {needle}")
    assert _tree(taken) == {"config.json": b'{"mine": true}'} and (tmp_path / "file").read_text() == "x"


def _fake_export(fail: bool):
    def write(directory, llava, processor, dtype=None):
        (Path(directory) / "config.json").write_text('{"new": true}')
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        if fail:
            raise OSError("No space left on device")
        return Path(directory)

    return write


def test_export_overwrite_replaces_the_folder_whole(tmp_path, capsys, monkeypatch):
    target = tmp_path / "llava"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "stale.bin").write_text("from an older export")
    monkeypatch.setattr(export, "build_source", lambda args: (None, None))
    monkeypatch.setattr(export, "export_llava", _fake_export(fail=False))
    assert cli_main(["export-llava", str(target), "--model", "some/llava", "--overwrite"]) == 0
    assert _tree(target) == {"config.json": b'{"new": true}', "model.safetensors": b"half a file"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]  # no temporary or old folder left


def test_interrupted_export_leaves_the_old_folder(tmp_path, capsys, monkeypatch):
    target = tmp_path / "llava"
    target.mkdir()
    (target / "config.json").write_text("old")
    monkeypatch.setattr(export, "build_source", lambda args: (None, None))
    monkeypatch.setattr(export, "export_llava", _fake_export(fail=True))
    assert cli_main(["export-llava", str(target), "--model", "some/llava", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "mugstan-chat: error: No space left on device"
    assert _tree(target) == {"config.json": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]
    assert cli_main(["export-llava", str(tmp_path / "new"), "--model", "some/llava"]) == 1
    assert not (tmp_path / "new").exists()  # a fresh export that fails leaves nothing


# llava-hf/llava-1.5-7b-hf's chat template: every image first, then each text part followed by ' '
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@pytest.mark.parametrize("template", ["demo", "llava-1.5"])
def test_the_template_for_vllm_renders_labels_in_order_as_our_engine_does(template):
    """Derived from the processor's own template (the demo's, and stock LLaVA-1.5's that puts images first):
    labels sent as text parts before their images come out where our engine writes them; the processor's
    template itself puts them after every image, and the check refuses it in one line."""
    processor = build_demo_processor()
    if template == "llava-1.5":
        processor.chat_template = LLAVA_15_TEMPLATE
    exported = in_order_template(processor.chat_template, processor.image_token)
    check_in_order_template(processor, exported)  # passes
    labels = ["Clip 1 (00:00-00:30): ", "Clip 2 (00:30-01:00): "]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q?"}]}]
    in_order = [{"role": "user", "content": [{"type": "text", "text": labels[0]}, {"type": "image"},
                                             {"type": "text", "text": labels[1]}, {"type": "image"},
                                             {"type": "text", "text": "q?"}]}]
    rendered = processor.tokenizer.apply_chat_template(in_order, chat_template=exported, add_generation_prompt=True,
                                                       tokenize=False)
    assert rendered == render_prompt(processor, messages, labels)
    assert rendered.startswith("USER: Clip 1 (00:00-00:30): <image>\nClip 2 (00:30-01:00): <image>\nq?")
    with pytest.raises(TemplateMismatch) as caught:
        check_in_order_template(processor, processor.chat_template)  # the processor's own: labels after the images
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the chat template for vLLM does not render our engine's")


def test_an_export_whose_template_drifts_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """The check runs on the file as written: a template that does not reproduce our prompt fails the export."""
    monkeypatch.setattr(export, "in_order_template", lambda template, image_token: template)  # no wrapping
    target = tmp_path / "llava"
    assert cli_main(["export-llava", str(target), "--demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("mugstan-chat export-llava: error: the chat template for vLLM does not render our engine's "
                          "prompt: at character ")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary sibling
