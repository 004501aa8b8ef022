"""MugStan dual encoder: both backbone families, baselines, checkpoints."""

import json

import pytest
import torch

from mugstan_chat.model.backbone import BackboneConfig, create_backbone, tiny_backbone_config
from mugstan_chat.model.checkpoint import CheckpointError
from mugstan_chat.model.dual_encoder import MugStan, MugStanConfig
from mugstan_chat.model.mug import MugConfig
from mugstan_chat.model.stan import StanConfig
from mugstan_chat.model.tokenizer import CaptionTokenizer

FAMILIES = [("hf", False), ("open_clip", False), ("open_clip", True)]


def _model(family="hf", coca=False, **kwargs):
    return MugStan(MugStanConfig(backbone=tiny_backbone_config(family, coca), **kwargs))


@pytest.mark.parametrize("family,coca", FAMILIES)
def test_backbone_interface_reproduces_the_native_forward(family, coca):
    vision, text = create_backbone(tiny_backbone_config(family, coca))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = vision(pixels)
        if family == "hf":
            native = vision.projection(vision.vision_model(pixel_values=pixels).pooler_output)
        else:
            native = vision.visual(pixels)
            native = native[0] if isinstance(native, tuple) else native
    torch.testing.assert_close(ours, native, atol=1e-6, rtol=0)
    tok = CaptionTokenizer(context_length=16)(["a red circle moving left", "a square"])
    features = text(tok.input_ids, tok.attention_mask)
    assert features.tokens.shape == (2, 16, 16) and features.pooled.shape == (2, 16)
    assert features.mask.sum(1).tolist() == [7, 4]  # <start> + words + <end>


def test_hf_text_tokens_match_clip_text_features():
    vision, text = create_backbone(tiny_backbone_config("hf"))
    tok = CaptionTokenizer(context_length=16)(["a red circle moving left"])
    features = text(tok.input_ids, tok.attention_mask)
    clip_text = text.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask.long())
    torch.testing.assert_close(features.pooled, text.projection(clip_text.pooler_output))


@pytest.mark.parametrize("family,coca", FAMILIES)
def test_forward_and_backward_through_stan(family, coca):
    model = _model(family, coca).train()
    tok = model.build_tokenizer()(["a red circle moving left", "a blue square growing"])
    frames, text = model(torch.randn(2, 4, 3, 32, 32), tok.input_ids, tok.attention_mask)
    assert frames.shape == (2, 4, 16) and text.tokens.shape == (2, 64, 16)
    model.score(text, frames).diagonal().sum().backward()
    assert model.stan.intra_frame[0].layer is not None
    grads = [p.grad for p in model.stan.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())


def test_reversing_frames_changes_stan_but_not_the_plain_clip_mean_baseline():
    torch.manual_seed(0)
    video = torch.randn(1, 5, 3, 32, 32)
    reverse = video.flip(1)
    stan = _model().eval()
    with torch.no_grad():
        a, b = stan.encode_video(video), stan.encode_video(reverse)
    assert not torch.allclose(a, b.flip(1), atol=1e-4)
    plain = _model(stan=None, mug=MugConfig(mode="mean")).eval()
    tok = plain.build_tokenizer()(["a red circle moving left"])
    with torch.no_grad():
        text = plain.encode_text(tok.input_ids, tok.attention_mask)
        s1 = plain.score(text, plain.encode_video(video))
        s2 = plain.score(text, plain.encode_video(reverse))
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)


def _round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MugStan.from_pretrained(tmp_path)
    saved = dict(model.state_dict())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    video = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().encode_video(video), loaded.encode_video(video))
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("family,coca", FAMILIES)
def test_full_round_trip_is_bit_exact(family, coca, tmp_path):
    model = _model(family, coca)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # trained weights, not the seed's
    assert _round_trip(model, tmp_path)["weights"] == "full"


def test_frozen_named_backbone_saves_only_the_branch(tmp_path):
    model = _model(stan=StanConfig(fuse_layer=-2), freeze_backbone=True)
    assert not any(p.requires_grad for p in model.vision.parameters())
    with torch.no_grad():
        for p in model.stan.parameters():
            p.add_(0.01 * torch.randn_like(p))
    saved = _round_trip(model, tmp_path)
    assert saved["weights"] == "branch"
    assert saved["backbone_fingerprint"] == {"width": 32, "layers": 6, "heads": 4, "patch_size": 8,
                                             "image_size": 32, "fuse_layer": 4}
    from safetensors.torch import load_file

    assert all(key.startswith("stan.") for key in load_file(str(tmp_path / "model.safetensors")))


def test_branch_on_a_mismatched_backbone_fails_clearly(tmp_path):
    _model(freeze_backbone=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["backbone"] = tiny_backbone_config("hf", image_size=48).__dict__
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="image_size: branch trained with 32, tower has 48"):
        MugStan.from_pretrained(tmp_path)


def test_missing_and_foreign_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MugStan.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a mugstan-chat checkpoint"):
        MugStan.from_pretrained(tmp_path)


def test_reloadability_of_backbone_configs():
    assert BackboneConfig(family="hf", name="openai/clip-vit-large-patch14").is_reloadable
    assert not BackboneConfig(family="open_clip", name="ViT-B-32").is_reloadable  # random open_clip weights
    assert tiny_backbone_config().is_reloadable


def test_hf_backbone_loads_from_a_local_directory(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = tiny_backbone_config("hf")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        CLIPModel(CLIPConfig(**config.model_config)).save_pretrained(tmp_path)  # what a downloaded model looks like
    vision, text = create_backbone(BackboneConfig(family="hf", name=str(tmp_path)))
    reference = CLIPModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vision(pixels), reference.get_image_features(pixel_values=pixels).pooler_output)
    assert BackboneConfig(family="hf", name=str(tmp_path)).is_reloadable


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "coca_ViT-B-32"])
def test_named_open_clip_models_build_without_weights(name):
    vision, text = create_backbone(BackboneConfig(family="open_clip", name=name, pretrained=None))
    assert vision.fingerprint() == {"width": 768, "layers": 12, "heads": 12, "patch_size": 32, "image_size": 224}
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        native = vision.visual(pixels)
        native = native[0] if isinstance(native, tuple) else native
        torch.testing.assert_close(vision(pixels), native, atol=1e-5, rtol=0)
