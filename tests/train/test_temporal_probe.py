"""The temporal probe's scoring and data checks (the training runs are measured in docs/temporal_probe.md)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.synthetic.families import make_time_reversal_dataset
from mugstan_train import temporal_probe
from mugstan_train.params import model_config


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    make_time_reversal_dataset(folder, pairs_per_family=2, seed=5, families=("horizontal", "fade"), size=32,
                               frames=8)
    return folder


def test_an_order_blind_model_scores_exactly_chance(pairs):
    torch.manual_seed(0)
    blind = MugStan(model_config("tiny", no_stan=True))
    result = temporal_probe.probe(blind, pairs, frames=4)
    assert result["pairwise_acc"] == 0.5 and result["per_family"] == {"horizontal": 0.5, "fade": 0.5}
    assert result["t2v_R@1"] == 0.0  # no clip is retrieved ahead of its own reversal
    assert result["test_clips"] == 8


def test_data_folders_are_checked(tmp_path, pairs, capsys):
    (tmp_path / "annotations.csv").write_text("video,caption\na.mp4,x\n")
    with pytest.raises(temporal_probe.ProbeDataError, match=r"missing column\(s\) \['pair'\]"):
        temporal_probe.read_pairs(tmp_path)
    (tmp_path / "annotations.csv").write_text("video,caption,pair\na.mp4,x,0\nb.mp4,x,0\nc.mp4,y,1\n")
    with pytest.raises(temporal_probe.ProbeDataError, match=r"pair\(s\) \['0', '1'\]"):
        temporal_probe.read_pairs(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        temporal_probe.main(["--out-dir", str(tmp_path / "out"), "--train-data", str(tmp_path),
                             "--test-data", str(pairs)])
    assert exit_.value.code == 2 and "annotations.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        temporal_probe.main(["--train-data", str(pairs)])  # --test-data missing


def test_the_recipe_runs_end_to_end_on_a_users_folder(tmp_path, pairs, monkeypatch, capsys):
    """Every stage runs through the trainer (batches capped at the folder's 8 clips); each variant's model is
    exported and the JSON holds its figures."""
    monkeypatch.setitem(temporal_probe.RECIPE, "image_steps", 2)
    monkeypatch.setitem(temporal_probe.RECIPE, "video_warmup_steps", 2)
    monkeypatch.setitem(temporal_probe.RECIPE, "steps", 2)
    out = tmp_path / "out"
    argv = ["--out-dir", str(out), "--train-data", str(pairs), "--test-data", str(pairs),
            "--variants", *temporal_probe.VARIANTS]
    assert temporal_probe.main([*argv, "--print-commands"]) == 0
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert not out.exists()  # printing runs nothing
    assert temporal_probe.main(argv) == 0
    report = json.loads((out / "temporal_probe.json").read_text())
    assert report["commands"] == printed and len(printed) == 2 + len(temporal_probe.VARIANTS)  # what ran
    assert list(report["results"]) == list(temporal_probe.VARIANTS)
    warm = MugStan.from_pretrained(out / "runs" / "video-text-warmup" / "final")
    args = json.loads((out / "runs" / "stan-mug-frame-token" / "args.json").read_text())
    assert args["init_stan"] and args["init_from"] == str(out / "runs" / "video-text-warmup" / "final")
    assert warm.stan is not None
    for name, result in report["results"].items():
        assert set(result["per_family"]) == {"horizontal", "fade"}
        assert 0.0 <= result["pairwise_acc"] <= 1.0
        model = MugStan.from_pretrained(result["model"])  # the exported model loads by path
        assert (model.stan is None) == (name == "plain CLIP (mean)")
        steps = [step for step, _ in result["order_sensitivity"]]
        assert steps == [2]  # measured at the last step at least
        assert result["order_blind_floor"] == pytest.approx(2 * math.log(2))
    assert report["results"]["plain CLIP (mean)"]["pairwise_acc"] == 0.5  # order-blind by construction
    assert [step for step, _ in report["video_warmup_order_sensitivity"]] == [2]
    assert (out / "runs" / "image-text-warmup" / "final").is_dir() and (out / "runs" / "video-text-warmup").is_dir()


def test_print_commands_shows_the_recipe_without_generating_data(tmp_path, capsys):
    assert temporal_probe.main(["--out-dir", str(tmp_path / "out"), "--print-commands"]) == 0
    text = capsys.readouterr().out
    commands = {line[2:]: None for line in text.splitlines() if line.startswith("# ")}
    assert list(commands) == ["image-text-warmup", "video-text-warmup", *temporal_probe.DEFAULT_VARIANTS]
    lines = [shlex.split(line) for line in text.splitlines() if line.startswith("python ")]
    baseline, stan = lines[2], lines[3]
    assert "--init-stan" in stan and "--init-stan" not in baseline and "--no-stan" in baseline
    steps = str(temporal_probe.RECIPE["steps"])
    assert stan[stan.index("--max-steps") + 1] == steps == baseline[baseline.index("--max-steps") + 1]
    clips = 2 * temporal_probe.DATA["train_pairs_per_family"] * len(temporal_probe.FAMILIES)
    assert lines[0][lines[0].index("--batch-size") + 1] == str(min(clips, temporal_probe.RECIPE["image_batch_size"]))
    assert not (tmp_path / "out").exists()
