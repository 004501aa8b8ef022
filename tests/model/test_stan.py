"""STAN (docs/design.md section 1) against the slow reference, plus its structural guarantees."""

import pytest
import torch

from mugstan_chat.model.backbone import create_backbone, tiny_backbone_config
from mugstan_chat.model.stan import STAN, CrossFrameModule, StanConfig, encode_video_tokens, fuse, temporal_mean

from reference import cross_frame_reference, intra_frame_reference, stan_encode_reference

FAMILIES = [("hf", False), ("open_clip", False), ("open_clip", True)]


def _backbone(family="hf", coca=False, **kwargs):
    vision, _ = create_backbone(tiny_backbone_config(family, coca, **kwargs))
    return vision.eval()


def _randomise(stan: STAN, seed: int = 1) -> STAN:
    """Gives every parameter (incl. the zero-initialised linears) random values, so no term hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in stan.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    return stan.eval()


@pytest.mark.parametrize("family,coca", FAMILIES)
@pytest.mark.parametrize("fuse_layer,layers", [(-1, 4), (-2, 3)])
def test_fast_matches_reference(family, coca, fuse_layer, layers):
    torch.manual_seed(0)
    backbone = _backbone(family, coca)
    stan = _randomise(STAN(backbone, StanConfig(num_layers=layers, fuse_layer=fuse_layer)))
    clips = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        fast = encode_video_tokens(backbone, stan, clips)
        for b in range(2):
            slow = stan_encode_reference(backbone, stan, clips[b])
            torch.testing.assert_close(fast[b], slow, atol=1e-5, rtol=0)


def test_alignment_and_fuse_layer_resolution():
    backbone = _backbone()  # 6 layers
    stan = STAN(backbone, StanConfig(num_layers=4))
    assert stan.fuse_layer == 5 and stan.source_layers == [2, 3, 4, 5]
    stan = STAN(backbone, StanConfig(num_layers=3, fuse_layer=-2))
    assert stan.fuse_layer == 4 and stan.source_layers == [2, 3, 4]
    with pytest.raises(ValueError, match="would read backbone layer"):
        STAN(backbone, StanConfig(num_layers=6, fuse_layer=-2))
    with pytest.raises(ValueError, match="outside"):
        STAN(backbone, StanConfig(fuse_layer=6))


def test_fresh_cross_frame_module_is_identity():
    module = CrossFrameModule(32, 4, drop_path=0.1).train()
    x = torch.randn(2, 1 + 5 * 16, 32)
    assert torch.equal(module(x, frames=5), x)


def test_intra_frame_weights_equal_aligned_backbone_layer():
    backbone = _backbone()
    stan = STAN(backbone, StanConfig(num_layers=3, fuse_layer=-2))
    for j, source in enumerate(stan.source_layers):
        copy_state = stan.intra_frame[j].layer.state_dict()
        source_state = backbone.layers[source].state_dict()
        assert copy_state.keys() == source_state.keys()
        for key in copy_state:
            assert torch.equal(copy_state[key], source_state[key])
        assert copy_state[key].data_ptr() != source_state[key].data_ptr()  # a copy, not a shared tensor


def test_drop_path_rates_grow_linearly():
    stan = STAN(_backbone(), StanConfig(num_layers=4, drop_path=0.1))
    rates = [m.drop_path.rate for m in stan.cross_frame]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert [m.drop_path.rate for m in stan.intra_frame] == rates


def test_cross_frame_drop_path_draws_per_clip_and_position():
    torch.manual_seed(0)
    module = CrossFrameModule(32, 4, drop_path=0.5).train()
    torch.nn.init.normal_(module.out.weight, std=0.1)
    T, L = 4, 16
    x = torch.randn(2, 1 + T * L, 32)
    delta = (module(x, T) - x)[:, 1:].reshape(2, T, L, 32)
    kept = delta.abs().sum(-1) > 0  # (B, T, L)
    assert (kept == kept[:, :1]).all()  # the same draw for every frame of a position
    assert kept[:, 0].any() and not kept[:, 0].all()  # positions of one batch drawn apart
    module.eval()  # no drop-path at evaluation
    assert ((module(x, T) - x)[:, 1:].abs().sum(-1) > 0).all()


def test_intra_frame_drop_path_on_attention_per_frame_not_on_mlp():
    torch.manual_seed(0)
    backbone = _backbone()
    T, L, B = 6, 16, 3
    x = torch.randn(B, 1 + T * L, 32)
    real = STAN(backbone, StanConfig(num_layers=1, drop_path=0.0)).intra_frame[0]
    zero = lambda layer, h: torch.zeros_like(h)  # noqa: E731
    from mugstan_chat.model.stan import IntraFrameModule

    mlp_only = IntraFrameModule(real.layer, zero, backbone.mlp_branch, drop_path=0.5).train()
    torch.testing.assert_close(mlp_only(x, T), x + backbone.mlp_branch(real.layer, x), rtol=0, atol=0)
    attention_only = IntraFrameModule(real.layer, backbone.attention_branch, zero, drop_path=0.5).train()
    with torch.no_grad():
        out = attention_only(x, T)
        cls, patches = x[:, :1], x[:, 1:].reshape(B, T, L, 32)
        per_frame = torch.cat([cls.unsqueeze(1).expand(B, T, 1, 32), patches], dim=2).reshape(B * T, L + 1, 32)
        attended = backbone.attention_branch(real.layer, per_frame).reshape(B, T, L + 1, 32)
    delta = (out - x)[:, 1:].reshape(B, T, L, 32)
    kept = delta.abs().sum(-1).gt(0).all(-1)  # (B, T): one draw for all of a frame's patches
    assert (delta.abs().sum(-1).gt(0) == kept[..., None]).all()
    assert kept.any() and not kept.all()
    # the video [CLS] receives the mean over frames of the same draws, scaled by 1 / keep
    expected_cls = x[:, 0] + (attended[:, :, 0] * kept[..., None] / 0.5).mean(1)
    torch.testing.assert_close(out[:, 0], expected_cls, rtol=1e-5, atol=1e-6)


def test_cross_frame_touches_only_the_same_spatial_position():
    torch.manual_seed(0)
    module = CrossFrameModule(32, 4, drop_path=0.0)
    torch.nn.init.normal_(module.out.weight, std=0.1)
    T, L = 4, 16
    x = torch.randn(1, 1 + T * L, 32)
    changed = x.clone()
    changed[0, 1 + 2 * L + 5] += 1.0  # frame 2, patch 5
    diff = (module(changed, T) - module(x, T)).abs().sum(-1)[0]
    assert diff[0] == 0  # video [CLS] passes through
    moved = diff[1:].view(T, L) > 0
    assert moved[:, 5].all() and not moved[:, torch.arange(L) != 5].any()
    # agrees with the reference on these inputs
    cls, patches = x[0, 0], [[x[0, 1 + t * L + l] for l in range(L)] for t in range(T)]
    _, ref = cross_frame_reference(cls, patches, module)
    torch.testing.assert_close(module(x, T)[0, 1:], torch.stack([p for row in ref for p in row]), atol=1e-5, rtol=0)


def test_intra_frame_touches_only_its_frame_and_the_video_cls():
    torch.manual_seed(0)
    backbone = _backbone()
    stan = _randomise(STAN(backbone, StanConfig()))
    module = stan.intra_frame[0]
    T, L = 3, 16
    x = torch.randn(1, 1 + T * L, 32)
    changed = x.clone()
    changed[0, 1 + 1 * L + 3] += 1.0  # frame 1, patch 3
    with torch.no_grad():
        diff = (module(changed, T) - module(x, T)).abs().sum(-1)[0]
        assert diff[0] > 0
        per_frame = diff[1:].view(T, L).sum(-1)
        assert per_frame[1] > 0 and per_frame[0] == 0 and per_frame[2] == 0
        cls, patches = x[0, 0], [[x[0, 1 + t * L + l] for l in range(L)] for t in range(T)]
        ref_cls, ref = intra_frame_reference(cls, patches, module, backbone.attention_branch, backbone.mlp_branch)
        out = module(x, T)[0]
        torch.testing.assert_close(out[0], ref_cls, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1:], torch.stack([p for row in ref for p in row]), atol=1e-5, rtol=0)


def test_changing_one_frame_before_stan_changes_only_that_frame():
    backbone = _backbone()
    stan = _randomise(STAN(backbone, StanConfig()))
    clips = torch.randn(1, 4, 3, 32, 32)
    changed = clips.clone()
    changed[0, 2] += 0.5
    with torch.no_grad():
        # layer 1 runs before STAN's first source layer (2): frames are still independent images
        early = (encode_video_tokens(backbone, None, changed, stop_at=1)
                 - encode_video_tokens(backbone, None, clips, stop_at=1)).abs().sum((-1, -2))[0]
        assert early[2] > 0 and early[[0, 1, 3]].eq(0).all()
        # after fusion every frame sees the change through the temporal branch
        late = (encode_video_tokens(backbone, stan, changed) - encode_video_tokens(backbone, stan, clips))
        assert (late.abs().sum((-1, -2))[0] > 0).all()


def test_fuse_adds_video_cls_to_every_frame_and_patches_in_place():
    hidden = torch.randn(2, 3, 5, 8)
    stan_out = torch.randn(2, 1 + 3 * 4, 8)
    fused = fuse(hidden, stan_out)
    for t in range(3):
        torch.testing.assert_close(fused[:, t, 0], hidden[:, t, 0] + stan_out[:, 0])
        torch.testing.assert_close(fused[:, t, 1:], hidden[:, t, 1:] + stan_out[:, 1 + 4 * t:1 + 4 * (t + 1)])


@pytest.mark.parametrize("frames", [1, 2, 7, 64])
@pytest.mark.parametrize("image_size", [32, 48])  # 16 and 36 patches: the 224 px / 336 px situation
def test_any_frame_count_and_patch_count(frames, image_size):
    backbone = _backbone(image_size=image_size, layers=4)
    stan = STAN(backbone, StanConfig(num_layers=2))
    with torch.no_grad():
        out = encode_video_tokens(backbone, stan, torch.randn(1, frames, 3, image_size, image_size))
    assert out.shape == (1, frames, backbone.num_patches + 1, 32)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="at most 64 frames"):
        encode_video_tokens(backbone, stan, torch.randn(1, 65, 3, image_size, image_size), stop_at=3)


def test_backbone_projection_option_is_off_by_default_and_used_when_on():
    backbone = _backbone()
    assert STAN(backbone, StanConfig()).backbone_projection is None
    stan = STAN(backbone, StanConfig(backbone_projection=True))
    assert len(stan.backbone_projection) == 3
    x = torch.randn(1, 2, 17, 32)
    torch.testing.assert_close(stan.arrange(x, 1)[0, 0], stan.backbone_projection[0](x[0, :, 0].mean(0)))


def test_temporal_mean_averages_frames():
    tokens = torch.randn(2, 5, 17, 32)
    torch.testing.assert_close(temporal_mean(tokens), tokens.mean(1))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    backbone = _backbone()
    stan = _randomise(STAN(backbone, StanConfig()))
    clips = torch.randn(1, 3, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        stan.zero_grad()
        encode_video_tokens(backbone, stan, clips, checkpointing=checkpointing).square().sum().backward()
        grads.append(stan.temporal_embedding.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
