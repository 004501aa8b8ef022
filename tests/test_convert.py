"""The converter of the authors' checkpoints: complete key mapping and identical embeddings."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from mugstan_chat.model import MugStan
from training.params import model_config

_spec = importlib.util.spec_from_file_location(
    "convert_official_checkpoint", Path(__file__).resolve().parents[1] / "scripts" / "convert_official_checkpoint.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)


def _official(model: MugStan) -> dict[str, torch.Tensor]:
    """Our tiny model's tensors under the authors' names (written independently of the converter's table)."""
    out = {"backbone.logit_scale": torch.tensor(4.6)}
    for key, value in model.state_dict().items():
        if key.startswith("vision.vision_model.encoder."):
            out["backbone." + key[len("vision.vision_model.encoder."):]] = value
        elif key.startswith("vision.vision_model."):
            out["backbone." + key[len("vision.vision_model."):]] = value
        elif key == "vision.projection.weight":
            out["backbone.visual_projection.weight"] = value
        elif key.startswith("text.text_model."):
            out["text_backbone." + key[len("text."):]] = value
        elif key == "text.projection.weight":
            out["text_backbone.text_projection.weight"] = value
        elif key == "stan.temporal_embedding":
            out["backbone.STAN_time_embed.weight"] = value
        elif key.startswith("stan.intra_frame."):
            j, rest = key[len("stan.intra_frame."):].split(".layer.")
            out[f"backbone.STAN_S_layers.{j}.{rest}"] = value
        elif key.startswith("stan.cross_frame."):
            j, rest = key[len("stan.cross_frame."):].split(".", 1)
            rest = rest.replace("norm.", "layernorm.").replace("out.", "temporal_fc.")
            if j == "0" and rest.startswith("attn.in_proj_"):  # layer 0 as separate q/k/v projections
                kind = rest[len("attn.in_proj_"):]
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"backbone.STAN_T_layers.0.attn.{name}_proj.{kind}"] = part
            else:
                out[f"backbone.STAN_T_layers.{j}.{rest}"] = value
        else:
            raise AssertionError(f"test mapping misses {key}")
    out["backbone.embeddings.position_ids"] = torch.arange(17)[None]
    return out


def _randomised_tiny() -> MugStan:
    torch.manual_seed(0)
    model = MugStan(model_config("tiny", stan_layers=2))
    with torch.no_grad():  # fresh STAN is partly zero / copied: make every tensor distinct
        for param in model.stan.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_convert_maps_every_tensor_and_matches_embeddings(tmp_path):
    source = _randomised_tiny()
    official = _official(source)
    torch.save({"meta": {"epoch": 3}, "state_dict": official}, tmp_path / "official.pth")
    assert convert.main([str(tmp_path / "official.pth"), str(tmp_path / "out"),
                         "--vision-heads", "4", "--text-heads", "4"]) == 0
    mapped = convert.map_keys(official)
    assert set(mapped) == set(source.state_dict())  # nothing left unmapped, nothing missing
    assert all(mapped[k].shape == v.shape for k, v in source.state_dict().items())
    converted = MugStan.from_pretrained(tmp_path / "out")
    assert converted.stan.config.num_layers == 2 and converted.image_size == 32
    video = torch.randn(2, 4, 3, 32, 32)
    tokens = source.build_tokenizer()(["a red circle moving left", "a green square"])
    with torch.no_grad():
        torch.testing.assert_close(converted.encode_video(video), source.encode_video(video), rtol=0, atol=0)
        a = converted.encode_text(tokens.input_ids, tokens.attention_mask)
        b = source.encode_text(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)


def test_unmapped_key_and_pickled_code_are_refused(tmp_path):
    official = _official(_randomised_tiny())
    with pytest.raises(convert.ConversionError, match="no mapping"):
        convert.map_keys({**official, "cls_head.fc.weight": torch.zeros(2, 2)})

    # an object of any class outside torch's allow-list needs code to unpickle
    torch.save({"state_dict": official, "args": argparse.Namespace(lr=1)}, tmp_path / "bad.pth")
    with pytest.raises(convert.ConversionError, match="refused"):
        convert.load_state_dict(tmp_path / "bad.pth")
