"""Retrieval / recognition metrics on hand-made score matrices, and the evaluation CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mugstan_chat.model import MugStan
from mugstan_chat.synthetic import make_synthetic_videos

from training.evaluate import (classification_metrics, main, pairwise_accuracy, ranks_of_relevant,
                               relevance_from_index, retrieval_metrics)
from training.params import model_config


def test_ranks_on_a_hand_made_matrix():
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.0],   # text 0 -> video 0: rank 1
                           [0.5, 0.4, 0.6, 0.0],   # text 1 -> video 1: rank 3
                           [0.1, 0.2, 0.3, 0.4],   # text 2 -> video 2: rank 2
                           [0.4, 0.3, 0.2, 0.1]])  # text 3 -> video 3: rank 4
    relevant = relevance_from_index(torch.arange(4), 4)
    assert ranks_of_relevant(scores, relevant).tolist() == [1, 3, 2, 4]
    m = retrieval_metrics(scores, relevant)
    assert m["t2v_R@1"] == 25.0 and m["t2v_R@5"] == 100.0 and m["t2v_MnR"] == 2.5 and m["t2v_MdR"] == 2.5
    # video-to-text, by column: v0 0.9 best; v1 0.4 best; v2 0.3 < 0.6; v3 0.1 < 0.4
    assert ranks_of_relevant(scores.T, relevant.T).tolist() == [1, 1, 2, 2]
    assert m["v2t_R@1"] == 50.0 and m["v2t_MdR"] == 1.5


def test_ties_count_against_and_several_relevant_items():
    scores = torch.tensor([[0.5, 0.5, 0.1]])
    assert ranks_of_relevant(scores, torch.tensor([[True, False, False]])).tolist() == [2]
    assert ranks_of_relevant(scores, torch.tensor([[True, True, False]])).tolist() == [1]
    with pytest.raises(ValueError):
        ranks_of_relevant(scores, torch.zeros(1, 3, dtype=torch.bool))


def test_classification_and_pairwise():
    scores = torch.tensor([[0.9, 0.1], [0.1, 0.2], [0.0, 0.3]])  # 3 classes x 2 videos
    assert classification_metrics(scores, torch.tensor([0, 1])) == {"top1": 50.0, "top5": 100.0}
    assert pairwise_accuracy(torch.tensor([1.0, 0.2, 0.5]), torch.tensor([0.0, 0.4, 0.5])) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_videos(root, num=6, seed=2, size=32, frames=12)
    return root


def test_cli_on_checkpoint_and_baseline(videos, tmp_path, capsys):
    model = MugStan(model_config("tiny", stan_layers=2))
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "metrics.json"
    common = ["--data", str(videos / "annotations.csv"), "--video-root", str(videos), "--frames", "4",
              "--workers", "0", "--output", str(out)]
    assert main(["--checkpoint", str(tmp_path / "ckpt"), *common]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["videos"] == 6 and 0 <= metrics["t2v_R@1"] <= 100 and metrics["v2t_MnR"] >= 1
    assert json.loads(out.read_text())["mug_mode"] == "frame-token"  # the checkpoint's own
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--mug-mode", "frame-token-simple", *common]) == 0
    assert json.loads(out.read_text())["mug_mode"] == "frame-token-simple"
    assert main(["--backbone", "tiny", *common]) == 0
    assert "t2v_R@1" in json.loads(out.read_text())
    labels = tmp_path / "labels.csv"
    labels.write_text("video,label\n" + "".join(f"pair{i // 2:04d}_{'ab'[i % 2]}.mp4,{i % 3}\n" for i in range(6)))
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\n")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--task", "recognition", "--data", str(labels),
                 "--class-names", str(tmp_path / "classes.txt"), "--video-root", str(videos), "--frames", "4",
                 "--workers", "0", "--output", str(out)]) == 0
    assert set(json.loads(out.read_text())) >= {"top1", "top5"}
