"""The trainer end to end on synthetic clips with the tiny backbone (CPU, a few steps each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mugstan_chat.model.backbone import tiny_backbone_config
from mugstan_chat.model.checkpoint import CheckpointError
from mugstan_chat.model.dual_encoder import MugStan, MugStanConfig

from mugstan_train import checkpoints as ckpt
from mugstan_train import train as train_module
from mugstan_train.post_pretrain import train
from tiny_training import tiny_training_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def videos(synthetic_videos) -> Path:
    return synthetic_videos(16, seed=0, size=32, frames=12).folder


_args = tiny_training_args


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["type"] == "train"]


def test_short_run_learns_and_exports(videos, tmp_path):
    # 8 steps on one repeated batch of 4: the loss must go down
    result = train(_args(videos, tmp_path, "--max-steps", "8", "--batch-size", "4", "--save-interval", "0"))
    assert len(result.losses) == 8
    assert sum(result.losses[-2:]) < sum(result.losses[:2])
    assert _losses(tmp_path) == pytest.approx(result.losses)
    loaded = MugStan.from_pretrained(result.final_dir)
    model = result.model.eval()
    video = torch.randn(2, 4, 3, 32, 32)
    tokens = model.build_tokenizer()(["a red circle moving left", "a blue square growing"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(video), model.encode_video(video), rtol=0, atol=0)
        a = loaded.encode_text(tokens.input_ids, tokens.attention_mask)
        b = model.encode_text(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)


def test_save_interval_zero_writes_only_the_final_export(videos, tmp_path, caplog):
    # 16 videos / batch 4: three epoch ends in 12 steps, none of which may leave a training checkpoint
    result = train(_args(videos, tmp_path, "--max-steps", "12", "--save-interval", "0", "--diagnostics-interval", "0"))
    assert result.final_dir.is_dir()
    assert not list(tmp_path.glob("checkpoints/step_*"))
    assert json.loads((result.final_dir / "config.json").read_text())["model"]["frames"] == 4  # for evaluation
    with caplog.at_level("WARNING"):
        again = train(_args(videos, tmp_path, "--max-steps", "1", "--save-interval", "0", "--resume", "latest"))
    assert "nothing to resume" in caplog.text and "--save-interval 0" in caplog.text
    assert len(again.losses) == 1


def test_diagnostics_are_logged(videos, tmp_path):
    train(_args(videos, tmp_path, "--max-steps", "4", "--save-interval", "0", "--diagnostics-interval", "2"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    diagnostics = [r for r in records if r["type"] == "diagnostics"]
    assert [r["step"] for r in diagnostics] == [2, 4]
    last = diagnostics[-1]
    assert last["order_sensitivity"] >= 0 and last["temporal_embedding"] > 0
    assert last["cross_frame0_out"] > 0  # the zero-initialised output linear has left zero after 4 steps
    assert last["cross_frame0_out_grad"] > 0


def test_resume_matches_uninterrupted_run(videos, tmp_path):
    # 16 videos / batch 4 = 4 steps per epoch: 6 steps cross an epoch boundary; drop-path stays on (RNG restore)
    whole = train(_args(videos, tmp_path / "whole", "--max-steps", "6", "--save-interval", "2"))
    first = train(_args(videos, tmp_path / "split", "--max-steps", "6", "--save-interval", "2",
                        "--stop-at-step", "3"))
    assert first.final_dir is None and len(first.losses) == 3
    second = train(_args(videos, tmp_path / "split", "--max-steps", "6", "--save-interval", "2",
                         "--resume", "latest"))
    assert len(second.losses) == 3
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(whole.losses),
                               rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), second.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    model = {"w": torch.ones(3)}
    optim = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
             "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.98)}]}
    rng = {"rank0.cpu": torch.get_rng_state()}
    ckpt.save_training_checkpoint(root, 1, model, optim, rng, {"train": {"step": 1}})
    real = ckpt._write_tensors
    calls = []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the model file is written, then the process "dies" on the optimiser file
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_write_tensors", failing)
    with pytest.raises(OSError):
        ckpt.save_training_checkpoint(root, 2, {"w": torch.zeros(3)}, optim, rng, {"train": {"step": 2}})
    latest = ckpt.resolve_resume("latest", root)
    assert latest.name == "step_00000001"
    loaded = ckpt.load_training_checkpoint(latest)
    torch.testing.assert_close(loaded.model["w"], torch.ones(3))
    assert loaded.optimizer["param_groups"][0]["betas"] == (0.9, 0.98)
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000002").exists()


def test_init_from_loads_towers_and_rebuilds_stan(videos, tmp_path):
    # an image-text warm-up (plain CLIP, one frame), then a STAN run starting from it
    warm = train(_args(videos, tmp_path / "warm", "--max-steps", "2", "--no-stan", "--mug-mode", "mean",
                       "--frames", "1", "--save-interval", "0", "--seed", "3"))
    result = train(_args(videos, tmp_path / "run", "--max-steps", "1", "--lr-backbone", "0", "--lr-stan", "0",
                         "--save-interval", "0", "--init-from", str(warm.final_dir)))
    loaded = MugStan.from_pretrained(warm.final_dir)
    for name in ("vision", "text"):
        for key, value in getattr(loaded, name).state_dict().items():
            torch.testing.assert_close(getattr(result.model, name).state_dict()[key], value, rtol=0, atol=0)
    layer = result.model.stan.source_layers[0]  # STAN's intra-frame copy starts from the *loaded* layer
    for key, value in loaded.vision.layers[layer].state_dict().items():
        torch.testing.assert_close(result.model.stan.intra_frame[0].layer.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(MugStan(MugStanConfig(backbone=tiny_backbone_config(seed=0), stan=None))
                           .vision.layers[layer].state_dict()[key], value)  # the warm-up changed it
    with pytest.raises(SystemExit):  # a frozen run would export a branch for the wrong tower
        train(_args(videos, tmp_path / "bad", "--freeze-backbone", "--init-from", str(warm.final_dir)))



def test_init_stan_keeps_the_saved_branch(videos, tmp_path):
    # a frame-text video run, then a frame-token run going on from its towers *and* its STAN
    first = train(_args(videos, tmp_path / "first", "--max-steps", "2", "--mug-mode", "frame-text",
                        "--save-interval", "0", "--seed", "3"))
    result = train(_args(videos, tmp_path / "next", "--max-steps", "1", "--lr-backbone", "0", "--lr-stan", "0",
                         "--save-interval", "0", "--mug-mode", "frame-token", "--init-from", str(first.final_dir),
                         "--init-stan"))
    loaded = MugStan.from_pretrained(first.final_dir)
    for name in ("vision", "text", "stan"):
        for key, value in getattr(loaded, name).state_dict().items():
            torch.testing.assert_close(getattr(result.model, name).state_dict()[key], value, rtol=0, atol=0)
    assert loaded.stan.cross_frame[0].out.weight.abs().max() > 0  # trained, so not what a fresh branch holds
    with pytest.raises(CheckpointError, match="2-layer STAN"):
        train(_args(videos, tmp_path / "bad", "--max-steps", "1", "--stan-layers", "3", "--init-from",
                    str(first.final_dir), "--init-stan"))
    warm = train(_args(videos, tmp_path / "warm", "--max-steps", "1", "--no-stan", "--mug-mode", "mean",
                       "--frames", "1", "--save-interval", "0"))
    with pytest.raises(CheckpointError, match="has no STAN branch"):
        train(_args(videos, tmp_path / "bad2", "--max-steps", "1", "--init-from", str(warm.final_dir),
                    "--init-stan"))
    with pytest.raises(SystemExit):
        train(_args(videos, tmp_path / "bad3", "--max-steps", "1", "--init-stan"))

def test_group_column_resume_is_exact_and_checked(videos, tmp_path):
    grouped = ("--group-column", "pair", "--max-steps", "5", "--save-interval", "2")
    whole = train(_args(videos, tmp_path / "whole", *grouped))
    first = train(_args(videos, tmp_path / "split", *grouped, "--stop-at-step", "3"))
    with pytest.raises(ckpt.TrainingCheckpointError, match="group-column"):
        train(_args(videos, tmp_path / "split", "--max-steps", "5", "--save-interval", "2", "--resume", "latest"))
    second = train(_args(videos, tmp_path / "split", *grouped, "--resume", "latest"))
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(whole.losses),
                               rtol=1e-5, atol=1e-6)


def test_freeze_backbone_changes_only_stan(videos, tmp_path):
    result = train(_args(videos, tmp_path, "--max-steps", "2", "--freeze-backbone", "--save-interval", "0"))
    assert result.model.stan.fuse_layer == 4  # -2 of the tiny 6-layer backbone: LLaVA's feature layer
    fresh = MugStan(MugStanConfig(backbone=tiny_backbone_config(seed=0), stan=None))
    trained = result.model.state_dict()
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["weights"] == "branch"
    reference = MugStan(result.model.config).stan.state_dict()
    assert any(not torch.equal(v, reference[k]) for k, v in result.model.stan.state_dict().items())


def test_nonfinite_loss_skips_update_then_aborts(videos, tmp_path, monkeypatch):
    real = train_module.mug_contrastive_loss
    monkeypatch.setattr(train_module, "mug_contrastive_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(train_module.TrainingDiverged, match="non-finite"):
        train(_args(videos, tmp_path, "--max-steps", "4", "--max-nonfinite", "2", "--save-interval", "1"))
    # the one checkpoint written (after the first skipped step) holds the untouched initial weights
    saved = ckpt.load_training_checkpoint(ckpt.resolve_resume("latest", tmp_path / "checkpoints"))
    torch.manual_seed(0)  # the trainer builds the model under --seed
    fresh = MugStan(train_module.config_from_args(train_module.argparse.Namespace(**saved.state["args"])))
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(saved.model[name], value, rtol=0, atol=0, msg=name)


def test_two_process_gloo_matches_one_process(videos, tmp_path):
    """torchrun with 2 gloo ranks x 2 clips == one process with 4 clips: losses and weights after SGD.

    Plain SGD keeps the comparison about our code, not the BLAS: each update is lr x gradient, so the
    weights differ only by what the gradients' fp32 summation order moves (at most about n * 2^-24
    relative to the largest term for sums of n terms; n < 2e4 here, so 1e-3 of the tensor's largest
    update) plus the rounding of each weight update to the weight's own precision (half an ulp of |w|
    per step and run). A wrong all-gather or a gradient missing on one rank changes a tensor's update
    by a large fraction of itself, far above that bound. (Adam would turn last-bit noise in a near-zero
    gradient into a full-size update of either sign, so it is not used here.)
    """
    steps = 3
    common = ("--max-steps", str(steps), "--drop-path", "0", "--save-interval", "0", "--optimizer", "sgd",
              "--lr-backbone", "1e-2", "--lr-stan", "1e-2", "--weight-decay", "0", "--grad-clip", "0")
    single = train(_args(videos, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "training" / "post_pretrain.py"),
           *_args(videos, tmp_path / "two", *common)]
    cmd[cmd.index("--batch-size") + 1] = "2"  # 2 ranks x 2 = the single run's batch of 4
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the loss is a sum of 2 x 4 log-softmax terms of logits up to 100: fp32 order effects stay near 1e-6
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(single.losses),
                               rtol=1e-4, atol=1e-5)
    assert_weights_match_reference(single, tmp_path / "one", tmp_path / "two", steps)


def assert_weights_match_reference(single, one: Path, two: Path, steps: int) -> None:
    """The weights exported in ``two/final`` equal the one-process run ``single`` (written to ``one``) within the
    bound derived in :func:`test_two_process_gloo_matches_one_process` (plain SGD, no drop-path)."""
    torch.manual_seed(0)  # the trainer builds the model under --seed 0
    initial = MugStan(train_module.config_from_args(train_module.argparse.Namespace(
        **json.loads((one / "args.json").read_text())))).state_dict()
    two = MugStan.from_pretrained(two / "final").state_dict()
    ulp_half = torch.finfo(torch.float32).eps / 2
    updates = {name: value - initial[name] for name, value in single.model.state_dict().items()}
    largest = max(float(u.abs().max()) for u in updates.values())
    for name, value in single.model.state_dict().items():
        update, other = updates[name], two[name] - initial[name]
        if name.endswith("k_proj.bias"):
            # exactly zero gradient (softmax ignores a shift shared by a row's logits): both runs move these
            # only by rounding noise, far below every real update
            assert max(float(update.abs().max()), float(other.abs().max())) <= 1e-5 * largest, name
            continue
        bound = 1e-3 * update.abs().max() + 2 * steps * ulp_half * value.abs()
        assert ((two[name] - value).abs() <= bound).all(), \
            f"{name}: off by {float((two[name] - value).abs().max()):.3g}, update {float(update.abs().max()):.3g}"
    moved = [name for name, update in updates.items() if update.abs().max() > 0]
    assert any(name.startswith("stan.cross_frame") and "attn" in name for name in moved)  # reached after step 1
    assert len(moved) > len(updates) // 2  # the comparison covers real updates, not untouched weights


@pytest.mark.parametrize("script, bad_flag", [("post_pretrain.py", "--frames"), ("evaluate.py", "--frames")])
def test_checkout_entry_points_need_no_install(tmp_path, script, bad_flag):
    """``python training/<script>`` (the shims over mugstan_train) find the checkout's packages by themselves: from
    another directory with no PYTHONPATH, --help answers and a bad value is a usage error (exit 2) naming the flag."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    path = str(REPO / "training" / script)
    shown = subprocess.run([sys.executable, path, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and bad_flag in shown.stdout, shown.stderr[-2000:]
    refused = subprocess.run([sys.executable, path, bad_flag, "nan"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and bad_flag in refused.stderr and "Traceback" not in refused.stderr
