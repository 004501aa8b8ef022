"""Mug (docs/design.md section 2) against the literal reference, plus masks and chunking."""

import pytest
import torch

from mugstan_chat.model.mug import MugConfig, score_matrix

from reference import mug_score_reference


def _inputs(bt=3, bv=4, k=6, t=5, p=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(bt, k, p, generator=g)
    lengths = torch.tensor([k, k - 2, 2][:bt] + [k] * max(0, bt - 3))
    mask = torch.arange(k)[None] < lengths[:, None]
    pooled = torch.randn(bt, p, generator=g)
    frames = torch.randn(bv, t, p, generator=g)
    return tokens, mask, pooled, frames


@pytest.mark.parametrize("mode", ["frame-token", "frame-token-simple", "frame-text", "video-token", "mean"])
@pytest.mark.parametrize("topk", [None, 1, 2])
@pytest.mark.parametrize("tau", [100.0, 5.0])
def test_score_matrix_matches_reference(mode, topk, tau):
    tokens, mask, pooled, frames = _inputs()
    fast = score_matrix(tokens, mask, pooled, frames, config=MugConfig(mode=mode, topk=topk, tau=tau))
    slow = torch.stack([torch.stack([mug_score_reference(tokens[a], mask[a], pooled[a], frames[b], mode, tau, topk)
                                     for b in range(frames.shape[0])]) for a in range(tokens.shape[0])])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_default_is_frame_token_softmax_with_clip_logit_scale():
    config = MugConfig()
    assert (config.mode, config.tau, config.topk) == ("frame-token", 100.0, None)


@pytest.mark.parametrize("mode", ["frame-token", "frame-token-simple", "video-token"])
def test_padding_tokens_do_not_change_scores(mode):
    tokens, mask, pooled, frames = _inputs()
    base = score_matrix(tokens, mask, pooled, frames, config=MugConfig(mode=mode))
    pads = torch.randn(tokens.shape[0], 7, tokens.shape[2]) * 10  # large, arbitrary padding embeddings
    padded_tokens = torch.cat([tokens, pads], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 7, dtype=torch.bool)], dim=1)
    # also scramble the existing padded positions
    padded_tokens[~padded_mask] = torch.randn(int((~padded_mask).sum()), tokens.shape[2]) * 10
    padded = score_matrix(padded_tokens, padded_mask, pooled, frames, config=MugConfig(mode=mode))
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=0)


def test_padded_frames_are_ignored():
    tokens, mask, pooled, frames = _inputs()
    base = score_matrix(tokens, mask, pooled, frames)
    extra = torch.cat([frames, torch.randn(frames.shape[0], 3, frames.shape[2])], dim=1)
    frame_mask = torch.arange(extra.shape[1])[None].expand(frames.shape[0], -1) < frames.shape[1]
    torch.testing.assert_close(score_matrix(tokens, mask, pooled, extra, frame_mask), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_chunked_equals_unchunked(chunk):
    tokens, mask, pooled, frames = _inputs(bt=7, bv=5)
    whole = score_matrix(tokens, mask, pooled, frames, config=MugConfig(chunk_size=1000))
    torch.testing.assert_close(score_matrix(tokens, mask, pooled, frames, config=MugConfig(chunk_size=chunk)),
                               whole, atol=1e-5, rtol=0)


def test_chunk_size_bounds_the_block_size(monkeypatch):
    import mugstan_chat.model.mug as mug

    seen = []
    original = mug.pair_scores

    def spy(sim, *args, **kwargs):
        seen.append(sim.shape)
        return original(sim, *args, **kwargs)

    monkeypatch.setattr(mug, "pair_scores", spy)
    tokens, mask, pooled, frames = _inputs(bt=7, bv=5)
    score_matrix(tokens, mask, pooled, frames, config=MugConfig(chunk_size=2))
    assert max(s[0] * s[1] for s in seen) <= 4 and len(seen) == 4 * 3


def test_gradients_are_finite_with_fully_padded_rows():
    tokens, mask, pooled, frames = _inputs()
    frames.requires_grad_(True)
    frame_mask = torch.ones(frames.shape[:2], dtype=torch.bool)
    frame_mask[:, -2:] = False
    score_matrix(tokens, mask, pooled, frames, frame_mask).sum().backward()
    assert torch.isfinite(frames.grad).all()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown Mug mode"):
        MugConfig(mode="max")
    with pytest.raises(ValueError, match="topk"):
        MugConfig(topk=0)


def test_frame_token_simple_differs_from_the_paper_form():
    # same weightings, different aggregation: the two modes are not the same score
    tokens, mask, pooled, frames = _inputs()
    paper = score_matrix(tokens, mask, pooled, frames, config=MugConfig(mode="frame-token"))
    simple = score_matrix(tokens, mask, pooled, frames, config=MugConfig(mode="frame-token-simple"))
    assert (paper - simple).abs().max() > 1e-3


def test_mean_mode_averages_raw_frames_before_normalising():
    # frames of very different norms: the released order weights long frames more than a mean of unit vectors
    tokens, mask, pooled, frames = _inputs()
    frames = frames * torch.tensor([0.1, 1.0, 10.0, 1.0, 0.5])[None, :, None]
    scores = score_matrix(tokens, mask, pooled, frames, config=MugConfig(mode="mean"))
    raw_first = torch.nn.functional.normalize(frames.mean(1), dim=-1)
    unit_first = torch.nn.functional.normalize(torch.nn.functional.normalize(frames, dim=-1).mean(1), dim=-1)
    text = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(scores, text @ raw_first.T, atol=1e-6, rtol=0)
    assert (scores - text @ unit_first.T).abs().max() > 1e-3
