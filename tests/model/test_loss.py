"""Contrastive loss: symmetric InfoNCE, and the two-process gather equals one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from live_process import free_port
from mugstan_chat.model.loss import mug_contrastive_loss, symmetric_infonce
from mugstan_chat.model.mug import MugConfig


def test_symmetric_infonce_matches_definition():
    scores = torch.randn(4, 4)
    logits = 100 * scores
    text_to_video = sum(-torch.log_softmax(logits[i], 0)[i] for i in range(4)) / 4  # rows: texts
    video_to_text = sum(-torch.log_softmax(logits[:, i], 0)[i] for i in range(4)) / 4  # columns: videos
    torch.testing.assert_close(symmetric_infonce(scores), text_to_video + video_to_text)
    # chance level (every score equal) is 2 ln B: each direction contributes ln B
    torch.testing.assert_close(symmetric_infonce(torch.zeros(4, 4)), 2 * torch.log(torch.tensor(4.0)))


# The two-process check runs in float64: its tolerance then follows from double rounding (unit roundoff
# 1.1e-16, sums of a few hundred terms of logits up to 100) on any CPU and thread count, while a wrong
# gather or a missing gradient moves results by whole percents.
DTYPE = torch.float64


def _batch(seed=0, b=4, t=3, k=5, p=8, d=6):
    g = torch.Generator().manual_seed(seed)
    return dict(video_in=torch.randn(b, t, d, generator=g, dtype=DTYPE),
                text_in=torch.randn(b, k, d, generator=g, dtype=DTYPE),
                mask=torch.arange(k)[None] < torch.tensor([5, 3, 4, 2])[:, None])


def _model(seed=0, d=6, p=8):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, p, dtype=DTYPE), torch.nn.Linear(d, p, dtype=DTYPE)


def _loss(video_proj, text_proj, batch, rank=0, world_size=1):
    frames = video_proj(batch["video_in"])
    tokens = text_proj(batch["text_in"])
    pooled = tokens[:, 0]
    return mug_contrastive_loss(frames, tokens, batch["mask"], pooled, MugConfig(), rank, world_size)


def _worker(rank, world_size, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        batch = _batch()
        local = {key: value[rank * 2:(rank + 1) * 2] for key, value in batch.items()}
        video_proj, text_proj = _model()
        loss = _loss(video_proj, text_proj, local, rank, world_size)
        loss.backward()
        grads = []
        for param in list(video_proj.parameters()) + list(text_proj.parameters()):
            dist.all_reduce(param.grad)  # what DDP does: average over ranks
            grads.append(param.grad / world_size)
        queue.put((rank, loss.item(), [g.tolist() for g in grads]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_whole_batch():
    video_proj, text_proj = _model()
    loss = _loss(video_proj, text_proj, _batch())
    loss.backward()
    expected = [p.grad for p in list(video_proj.parameters()) + list(text_proj.parameters())]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, dist_loss, grads in results:
        assert dist_loss == pytest.approx(loss.item(), rel=1e-10)
        for got, want in zip(grads, expected):
            scale = float(want.abs().max())
            torch.testing.assert_close(torch.tensor(got, dtype=DTYPE), want, atol=1e-10 * scale, rtol=1e-10)
