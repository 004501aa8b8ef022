"""Retrieval / recognition metrics on hand-made score matrices, and the evaluation CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mugstan_chat.model.dual_encoder import MugStan

from mugstan_train.data import VideoRecord
from mugstan_train.evaluate import (classification_metrics, main, pairwise_accuracy, pairwise_from_pairs,
                                    ranks_of_relevant, relevance_by_caption, relevance_from_index, retrieval_metrics,
                                    score_tolerance)
from mugstan_train.params import model_config


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


def test_duplicated_captions_are_all_correct_and_near_ties_count_against():
    captions = ["a red circle", "a blue square"]
    relevant = relevance_by_caption(captions, [["a red circle"], ["a red circle"], ["a blue square"]])
    assert relevant.tolist() == [[True, True, False], [False, False, True]]
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.3, 0.2, 0.8]])
    assert retrieval_metrics(scores, relevant)["t2v_R@1"] == 100.0  # video 1 carries caption 0 too
    # an order-blind model scores a clip and its reversal alike up to fp32 summation order
    tol = score_tolerance(16)
    blind = torch.tensor([[0.5 + 1e-7, 0.5]])  # the right clip ahead of its reversal by rounding alone
    assert ranks_of_relevant(blind, torch.tensor([[True, False]])).tolist() == [1]  # exact comparison: a "win"
    assert ranks_of_relevant(blind, torch.tensor([[True, False]]), tol).tolist() == [2]  # a tie, counted against
    assert 1e-7 < tol < 1e-3


def test_pairwise_from_a_pair_column():
    videos = [VideoRecord("a.mp4", ["moving left"], extra={"pair": "0"}),
              VideoRecord("b.mp4", ["moving right"], extra={"pair": "0"}),
              VideoRecord("c.mp4", ["growing"], extra={"pair": "1"}),
              VideoRecord("d.mp4", ["shrinking"], extra={"pair": "1"})]
    captions = ["moving left", "moving right", "growing", "shrinking"]
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # pair 0: both videos prefer their own caption
                           [0.2, 0.8, 0.0, 0.0],
                           [0.0, 0.0, 0.4, 0.6],   # pair 1: video c right, video d wrong
                           [0.0, 0.0, 0.3, 0.5]])
    assert pairwise_from_pairs(scores, captions, videos, 1e-6) == pytest.approx(0.75)
    unpaired = [VideoRecord(v.video, v.captions) for v in videos]
    assert pairwise_from_pairs(scores, captions, unpaired, 1e-6) is None


@pytest.fixture(scope="module")
def videos(synthetic_videos) -> Path:
    return synthetic_videos(6, seed=2, size=32, frames=12).folder


def test_cli_on_checkpoint_and_baseline(videos, tmp_path, capsys):
    model = MugStan(model_config("tiny", stan_layers=2))
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "metrics.json"
    common = ["--data", str(videos / "annotations.csv"), "--video-root", str(videos), "--frames", "4",
              "--workers", "0", "--output", str(out), "--overwrite"]
    assert main(["--checkpoint", str(tmp_path / "ckpt"), *common]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["pairwise_acc"] is not None and 0 <= metrics["pairwise_acc"] <= 1  # the pair column
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
                 "--workers", "0", "--output", str(out), "--overwrite"]) == 0
    assert set(json.loads(out.read_text())) >= {"top1", "top5"}


def test_frames_default_to_the_checkpoints_own(videos, tmp_path):
    config = model_config("tiny", stan_layers=2)
    config.frames = 3
    MugStan(config).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "metrics.json"
    common = ["--data", str(videos / "annotations.csv"), "--video-root", str(videos), "--workers", "0",
              "--output", str(out), "--threads", "1", "--overwrite"]
    assert main(["--checkpoint", str(tmp_path / "ckpt"), *common]) == 0
    assert json.loads(out.read_text())["frames"] == 3
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--frames", "5", *common]) == 0
    assert json.loads(out.read_text())["frames"] == 5


@pytest.mark.parametrize("case", ["no_data", "no_classes", "classes_missing", "output_exists", "no_checkpoint",
                                  "bad_rows", "label_not_a_class"])
def test_bad_input_is_one_line(case, videos, tmp_path, capsys):
    """mugstan-evaluate: usage errors exit 2 before a model loads; data errors found while running exit 1; both
    one line, no traceback."""
    model = MugStan(model_config("tiny", stan_layers=2))
    model.save_pretrained(tmp_path / "ckpt")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(videos / "annotations.csv"), "--video-root",
            str(videos), "--frames", "4", "--workers", "0"]
    expected = 2
    if case == "no_data":
        argv[3] = str(tmp_path / "nowhere.csv")
    elif case == "no_classes":
        argv += ["--task", "recognition"]
    elif case == "classes_missing":
        argv += ["--task", "recognition", "--class-names", str(tmp_path / "nowhere.txt")]
    elif case == "output_exists":
        (tmp_path / "m.json").write_text("{}")
        argv += ["--output", str(tmp_path / "m.json")]
    elif case == "no_checkpoint":
        argv[1] = str(tmp_path / "no_ckpt")
    elif case == "bad_rows":
        (tmp_path / "bad.csv").write_text("clip,text\na.mp4,x\n")
        argv[3], expected = str(tmp_path / "bad.csv"), 1
    elif case == "label_not_a_class":
        (tmp_path / "labels.csv").write_text("video,label\npair0000_a.mp4,hexagon\n")
        (tmp_path / "classes.txt").write_text("circle\nsquare\n")
        argv[3], expected = str(tmp_path / "labels.csv"), 1
        argv += ["--task", "recognition", "--class-names", str(tmp_path / "classes.txt")]
    if expected == 2:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        code = stopped.value.code
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code == expected, err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("mugstan-evaluate") and "Traceback" not in err
    if case == "output_exists":
        assert (tmp_path / "m.json").read_text() == "{}"
