"""The converter of the authors' checkpoints on their real layout: completeness, architecture, refusals.

Every case starts from tests/fixtures/authors/mugstan_tiny.pth, saved by the
authors' own model code (scripts/make_reference_fixtures.py), never from key names
written here.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mugstan_chat.model import authors_checkpoint as official

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "authors" / "mugstan_tiny.pth"
SIZES = dict(vision_heads=4, text_heads=4)


@pytest.fixture(scope="module")
def authors() -> official.OfficialCheckpoint:
    return official.load_official_checkpoint(FIXTURE)


def _without(checkpoint: official.OfficialCheckpoint, *prefixes: str) -> official.OfficialCheckpoint:
    state = {k: v for k, v in checkpoint.state.items() if not k.startswith(prefixes)}
    assert len(state) < len(checkpoint.state)
    return official.OfficialCheckpoint(state=state, config_text=checkpoint.config_text, source="trimmed.pth")


def test_reads_an_mmengine_checkpoint_weights_only(authors):
    # meta holds the config text, message_hub holds mmengine history buffers (read as inert stand-ins)
    assert "VITCLIPPretrained_STAN" in authors.config_text
    assert "backbone.class_embedding" in authors.state and "backbone.STAN_T_layers.0.temporal_fc.weight" in authors.state
    mapped = official.map_keys(authors.state)
    model, arch = official.convert(authors, vision_layers=6, text_layers=2, **SIZES)
    assert set(mapped) == set(model.state_dict())  # every tensor mapped, every parameter filled
    assert (arch.stan_layers, arch.mug_mode) == (3, "frame-token-simple")


def test_missing_stan_layer_is_refused_and_named(authors):
    trimmed = _without(authors, "backbone.STAN_S_layers.2.", "backbone.STAN_T_layers.2.")
    with pytest.raises(official.ConversionError) as error:  # depth 3 comes from the checkpoint's own config
        official.convert(trimmed, vision_layers=6, text_layers=2, **SIZES)
    assert "backbone.STAN_S_layers.2.*" in str(error.value) and "backbone.STAN_T_layers.2.*" in str(error.value)
    assert "STAN layers: 3 (checkpoint config)" in str(error.value)


@pytest.mark.parametrize("layer", [5, 2])  # the last layer, and a gap
def test_missing_backbone_layer_is_refused_and_named(authors, layer):
    trimmed = _without(authors, f"backbone.layers.{layer}.")
    with pytest.raises(official.ConversionError, match=rf"missing backbone\.layers\.{layer}\.\* \(16 tensors\)"):
        official.convert(trimmed, vision_layers=6, text_layers=2, **SIZES)


def test_keys_are_only_the_last_resort_and_warn(authors, caplog):
    trimmed = _without(authors, "backbone.layers.5.")
    with caplog.at_level(logging.WARNING, logger="mugstan_chat.model.authors_checkpoint"):
        model, arch = official.convert(trimmed, text_layers=2, **SIZES)
    assert arch.vision_layers == 5 and "vision layers: nothing states it" in caplog.text


def test_cli_refuses_in_one_line_and_converts(authors, tmp_path):
    trimmed = _without(authors, "backbone.STAN_S_layers.2.", "backbone.STAN_T_layers.2.")
    torch.save({"meta": {"cfg": authors.config_text}, "state_dict": trimmed.state}, tmp_path / "trimmed.pth")
    cli = [sys.executable, "-m", "mugstan_chat", "convert-official"]
    flags = ["--vision-layers", "6", "--text-layers", "2", "--vision-heads", "4", "--text-heads", "4"]
    done = subprocess.run([*cli, str(tmp_path / "trimmed.pth"), str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("mugstan-chat convert-official: error: ") and "backbone.STAN_T_layers.2.*" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    done = subprocess.run([*cli, str(FIXTURE), str(tmp_path / "ok"), *flags], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_cli_never_replaces_a_folder_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli = [sys.executable, "-m", "mugstan_chat", "convert-official", str(FIXTURE), str(out), "--vision-layers", "6",
           "--text-layers", "2", "--vision-heads", "4", "--text-heads", "4"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "OUTPUT" in done.stderr and "--overwrite" in done.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    missing = subprocess.run([*cli[:4], str(tmp_path / "nope.pth"), str(tmp_path / "new")], capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "nope.pth" in missing.stderr and not (tmp_path / "new").exists()
    done = subprocess.run([*cli, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_unmapped_and_invented_keys_are_refused(authors):
    with pytest.raises(official.ConversionError, match="no mapping"):
        official.map_keys({**authors.state, "cls_head.fc.weight": torch.zeros(2, 2)})
    # the layout this converter once assumed, which no released file uses
    invented = {k.replace("backbone.class_embedding", "backbone.embeddings.class_embedding"): v
                for k, v in authors.state.items()}
    with pytest.raises(official.ConversionError, match="no mapping"):
        official.map_keys(invented)
    # position_ids buffers (older transformers saved them) and logit_scale are dropped
    extra = {**authors.state, "text_backbone.text_model.embeddings.position_ids": torch.arange(16)[None],
             "logit_scale": torch.tensor(4.6)}
    assert set(official.map_keys(extra)) == set(official.map_keys(authors.state))


def test_pickled_code_is_refused(authors, tmp_path):
    torch.save({"state_dict": authors.state, "args": argparse.Namespace(lr=1)}, tmp_path / "bad.pth")
    with pytest.raises(official.ConversionError, match=r"refused.*argparse\.Namespace"):
        official.load_official_checkpoint(tmp_path / "bad.pth")


def _shapes(vision_width: int, text_width: int, stan: bool = True) -> dict[str, torch.Tensor]:
    """Just the two tensors whose widths resolve_architecture reads (shapes of the released towers)."""
    state = {"vision.vision_model.embeddings.class_embedding": torch.zeros(vision_width),
             "text.text_model.embeddings.token_embedding.weight": torch.zeros(2, text_width)}
    if stan:
        state["stan.temporal_embedding"] = torch.zeros(1)
    return state


@pytest.mark.parametrize("vision,text,layers", [(768, 512, 12), (1024, 768, 24)])
def test_released_sizes_by_width(vision, text, layers):
    arch = official.resolve_architecture(_shapes(vision, text))
    assert (arch.vision_layers, arch.text_layers, arch.stan_layers) == (layers, 12, 4)
    assert arch.mug_mode == "frame-token-simple"


def test_architecture_from_the_released_configs(authors):
    base = authors.config_text
    assert "adapter=dict(input_dim=512, tau=100, type='Mug_head')" in base  # the released Mug config
    large = base.replace(base[base.index("pretrained_model='"):].split("'")[1], "openai/clip-vit-large-patch14")
    arch = official.resolve_architecture(_shapes(1024, 768), large)
    assert (arch.vision_layers, arch.stan_layers, arch.mug_mode) == (24, 3, "frame-token-simple")
    paper_form = base.replace("type='Mug_head')", "type='Mug_head', mode='mug_frame_token')")
    assert official.resolve_architecture(_shapes(768, 512), paper_form).mug_mode == "frame-token"
    no_head = base.replace("adapter=dict(input_dim=512, tau=100, type='Mug_head')", "adapter=None")
    assert official.resolve_architecture(_shapes(768, 512), no_head).mug_mode == "mean"  # plain STAN configs
    given = official.resolve_architecture(_shapes(768, 512), base, vision_layers=7, stan_layers=2)
    assert (given.vision_layers, given.stan_layers) == (7, 2)
