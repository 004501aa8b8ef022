"""The video tower inside a tiny random LLaVA: identity with stock LLaVA, shapes, frame order,
branch checks, and the loader's quantisation config. CPU only, no network."""

import numpy as np
import pytest
import torch

from mugstan_chat.model.backbone import HFCLIPVision
from mugstan_chat.model.checkpoint import CheckpointError
from mugstan_chat.llava.demo import DemoSizes, build_demo_branch, build_demo_llava, save_demo_branch
from mugstan_chat.llava.tower import (
    VideoTower, install_video_tower, load_stan_branch, resolve_feature_layer, uninstall_video_tower)
from mugstan_chat.llava.loader import (
    QUANT_SKIP_MODULES, ModelLoadError, build_quantization_config, load_chat_model)


@pytest.fixture(scope="module")
def llava():
    return build_demo_llava(seed=0)


def _prompt_ids(processor, clips: int, question: str = "what happens in the video?") -> torch.Tensor:
    """input_ids with C <image> placeholders expanded to one clip's tokens each."""
    content = [{"type": "image"}] * clips + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    per_clip = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
    text = text.replace(processor.image_token, processor.image_token * per_clip)
    return processor.tokenizer(text, return_tensors="pt").input_ids


def _clips(C: int, T: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(C, T, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_feature_layer_resolution():
    assert resolve_feature_layer(-2, 24) == 22  # LLaVA-1.5: hidden_states[-2] is the output of layer N-2
    assert resolve_feature_layer(-1, 24) == 23
    assert resolve_feature_layer(5, 24) == 4  # hidden_states[0] is the embedding output
    with pytest.raises(ValueError):
        resolve_feature_layer(-30, 24)
    with pytest.raises(ValueError):
        resolve_feature_layer([-2, -5], 24)


def test_mean_mode_one_frame_equals_stock_llava(llava):
    model, processor = llava
    frame = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what happens?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=text, images=[frame], return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
        tower = install_video_tower(model, None, mode="mean")
        try:
            video = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                          pixel_values=inputs.pixel_values[:, None]).logits  # (C=1, T=1, 3, H, W)
            image = model(**inputs).logits  # 4-D images still take the stock path
        finally:
            uninstall_video_tower(model)
    diff = (stock - video).abs().max().item()
    print(f"identity max abs diff: {diff:.3e}")
    assert tower.calls == 2
    assert diff <= 1e-5
    assert (stock - image).abs().max().item() <= 1e-5


@pytest.mark.parametrize("frames", [1, 4, 8, 16])
def test_stan_mode_gives_one_image_of_tokens_per_clip(llava, frames):
    model, _ = llava
    tower = VideoTower(model.model.vision_tower, build_demo_branch(HFCLIPVision(model.model.vision_tower)),
                       model.config.vision_feature_layer, mode="stan")
    with torch.no_grad():
        out = tower(_clips(2, frames), return_dict=True, output_hidden_states=-2)
    L = (32 // 8) ** 2
    assert out.hidden_states[-2].shape == (2, L + 1, 32)
    assert len(out.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert sum(h is not None for h in out.hidden_states) == 1  # only the layer LLaVA reads is computed
    assert tower.tokens_per_clip == L + 1


@pytest.fixture(scope="module")
def stan_llava():
    """A tiny LLaVA whose tower carries a branch with non-zero cross-frame output linears."""
    model, processor = build_demo_llava(seed=1)
    branch = build_demo_branch(HFCLIPVision(model.model.vision_tower), seed=1)
    tower = install_video_tower(model, branch, mode="stan")
    return model, processor, tower


def test_clips_fill_their_placeholders(stan_llava):
    model, processor, _ = stan_llava
    with torch.no_grad():
        for C in (1, 3):
            ids = _prompt_ids(processor, C)
            assert (ids == model.config.image_token_id).sum() == C * 16
            logits = model(input_ids=ids, pixel_values=_clips(C, 4)).logits
            assert logits.shape[:2] == ids.shape
        with pytest.raises(Exception, match="Image features and image tokens do not match"):
            model(input_ids=_prompt_ids(processor, 2), pixel_values=_clips(3, 4))


def test_frame_order_matters_in_stan_mode_only(stan_llava):
    model, processor, tower = stan_llava
    ids = _prompt_ids(processor, 1)
    clips = _clips(1, 8, seed=3)
    reversed_clips = clips.flip(1)
    with torch.no_grad():
        tower.mode = "stan"
        stan_fwd, stan_rev = (model(input_ids=ids, pixel_values=c).logits for c in (clips, reversed_clips))
        tower.mode = "mean"
        mean_fwd, mean_rev = (model(input_ids=ids, pixel_values=c).logits for c in (clips, reversed_clips))
        tower.mode = "stan"
    assert (stan_fwd - stan_rev).abs().max().item() > 1e-3
    assert (mean_fwd - mean_rev).abs().max().item() <= 1e-5
    assert (stan_fwd - mean_fwd).abs().max().item() > 1e-3


def test_branch_fingerprint_is_checked(llava, tmp_path):
    model, _ = llava
    vision, layer = model.model.vision_tower, model.config.vision_feature_layer
    good = save_demo_branch(tmp_path / "good")
    assert load_stan_branch(good, vision, layer).fuse_layer == 2

    at_64px = save_demo_branch(tmp_path / "64px", image_size=64)
    with pytest.raises(CheckpointError, match="image_size: branch trained with 64, tower has 32"):
        load_stan_branch(at_64px, vision, layer)
    stan = load_stan_branch(at_64px, vision, layer, allow_image_size_mismatch=True)  # the 224-on-336 override
    assert stan.trained_fingerprint["image_size"] == 64

    wider = save_demo_branch(tmp_path / "wide", sizes=DemoSizes(vision_width=48))
    with pytest.raises(CheckpointError, match="width: branch trained with 48, tower has 32"):
        load_stan_branch(wider, vision, layer, allow_image_size_mismatch=True)  # the override is for size only
    with pytest.raises(CheckpointError, match="fuses at layer 2 but LLaVA reads the output of layer 3"):
        load_stan_branch(good, vision, -1)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stan_branch(tmp_path / "missing", vision, layer)


def test_branch_saved_by_mugstan_loads_onto_the_llava_tower(llava, tmp_path):
    from mugstan_chat.model.backbone import BackboneConfig
    from mugstan_chat.model.dual_encoder import MugStan, MugStanConfig
    from mugstan_chat.model.stan import StanConfig

    model, _ = llava
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 49408, "max_position_embeddings": 77}
    vision = {k: v for k, v in model.config.vision_config.to_dict().items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")}
    trained = MugStan(MugStanConfig(
        backbone=BackboneConfig(family="hf", model_config={"vision_config": vision, "text_config": text,
                                                           "projection_dim": 16}),
        stan=StanConfig(num_layers=2, fuse_layer=-2), freeze_backbone=True))
    trained.save_pretrained(tmp_path / "branch")
    stan = load_stan_branch(tmp_path / "branch", model.model.vision_tower, model.config.vision_feature_layer)
    for key, value in trained.stan.state_dict().items():
        torch.testing.assert_close(stan.state_dict()[key], value)


def test_quantisation_config_keeps_tower_and_projector_16_bit():
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert build_quantization_config() is None
    four = build_quantization_config(load_4bit=True, compute_dtype=torch.bfloat16)
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and four.bnb_4bit_quant_type == "nf4"
    eight = build_quantization_config(load_8bit=True)
    assert eight.load_in_8bit and not eight.load_in_4bit
    for config in (four, eight):
        assert config.llm_int8_skip_modules == QUANT_SKIP_MODULES
        skip = config.llm_int8_skip_modules
        for kept in ("model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_1",
                     "lm_head"):
            assert not should_convert_module(kept, skip)
        assert should_convert_module("model.language_model.layers.0.mlp.up_proj", skip)
    with pytest.raises(ModelLoadError, match="one of"):
        build_quantization_config(load_4bit=True, load_8bit=True)
    with pytest.raises(ModelLoadError, match="some/llava"):  # CPU is allowed now (bitsandbytes >= 0.49); offline
        load_chat_model("some/llava", load_4bit=True, device="cpu")


def test_missing_weights_offline_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        load_chat_model(str(tmp_path / "no-such-llava"), device="cpu")
    message = str(error.value)
    assert "no-such-llava" in message and "\n" not in message


def test_loader_on_a_saved_llava_directory(llava, tmp_path):
    model, processor = llava
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    plain = load_chat_model(str(tmp_path / "llava"), device="cpu")
    assert plain.settings.temporal == "mean" and "temporal mean mode" in plain.notice
    branch = save_demo_branch(tmp_path / "branch")
    fused = load_chat_model(str(tmp_path / "llava"), stan=branch, device="cpu", dtype="fp32")
    assert fused.settings.temporal == "stan" and fused.notice == ""
    assert isinstance(fused.model.model.vision_tower, VideoTower) and fused.tower.stan is not None
    mean_default = load_chat_model(str(tmp_path / "llava"), stan=branch, temporal="mean", device="cpu")
    assert mean_default.tower.mode == "mean" and mean_default.tower.available_modes == ["stan", "mean"]
