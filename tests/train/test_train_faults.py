"""The trainer's faults: unusable shards, a stream that never yields, bad arguments and damaged checkpoints end in
one line naming the file and the reason (exit 1 at run time, 2 for usage), never a traceback."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mugstan_chat.video import VideoBytes, VideoDecodeError, probe_video

from mugstan_train import checkpoints as ckpt
from mugstan_train.post_pretrain import main, train
from tiny_training import tiny_training_args

BATCH = 2


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as handle:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    return path


def _garbage(seed: int, size: int = 3000) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """Shards no batch can come from, one kind of damage each."""
    root = tmp_path_factory.mktemp("broken")
    (root / "empty.tar").write_bytes(b"")
    _tar(root / "txt.tar", [(f"{i:04d}.txt", b"a caption") for i in range(5)])
    _tar(root / "txt2.tar", [(f"{i:04d}.txt", b"a caption") for i in range(5, 8)])
    _tar(root / "garbage.tar", [m for i in range(5) for m in ((f"{i:04d}.mp4", _garbage(i)),
                                                               (f"{i:04d}.txt", b"a caption"))])
    (root / "dir.tar").mkdir()
    return root


def _shard_args(spec: str, out: Path, *extra: str) -> list[str]:
    return ["--backbone", "tiny", "--train-data", spec, "--train-num-samples", "4", "--batch-size", str(BATCH),
            "--frames", "2", "--stan-layers", "1", "--workers", "0", "--output-dir", str(out),
            "--diagnostics-interval", "0", *extra]


def _one_line_error(err: str, *needles: str) -> str:
    """The error line: the last on stderr, from mugstan-train, holding every needle; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "error: " in line, err[-3000:]
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("shard, needles", [
    ("empty.tar", ["empty.tar", "shard_error 1", "ReadError", "0 usable clips"]),
    ("txt.tar", ["txt.tar:0000", "no_video 5", "0 usable clips"]),
    ("garbage.tar", ["garbage.tar:0000", "decode_error 5", "not a video"]),
    ("dir.tar", ["dir.tar", "shard_error 1", "IsADirectoryError"]),
])
def test_shards_that_give_no_batch_fail_in_one_line_with_the_counts(broken, tmp_path, capsys, shard, needles):
    assert main(_shard_args(str(broken / shard), tmp_path)) == 1
    line = _one_line_error(capsys.readouterr().err, "mugstan-train: error: epoch 0: the shards gave no batch",
                           *needles)
    assert "{}" not in line


def test_counts_of_reader_processes_reach_the_message(broken, tmp_path, capsys):
    # two worker processes, one shard each: 5 + 3 samples without an mp4, counted in the workers
    spec = f"{broken}/{{txt,txt2}}.tar"
    assert main(_shard_args(spec, tmp_path, "--workers", "2")) == 1
    _one_line_error(capsys.readouterr().err, "no_video 8", "txt")


def test_diagnostics_probe_of_unusable_shards_names_the_reason(broken, tmp_path, capsys):
    args = _shard_args(str(broken / "txt.tar"), tmp_path)
    args[args.index("--diagnostics-interval") + 1] = "10"  # the probe batch reads the shards first
    assert main(args) == 1
    _one_line_error(capsys.readouterr().err, "txt.tar", "no sample with a video and a caption", "no_video 5")


@pytest.mark.parametrize("shard, reason", [("garbage.tar", "decode_error"), ("dir.tar", "shard_error"),
                                           ("txt.tar", "no_video")])
def test_resampled_broken_shards_stop_after_the_bound_without_decoder_noise(broken, tmp_path, capfd, shard, reason):
    # resampled, these streams never end; 30 skips in a row must stop them, and decord must not dump the bytes
    args = _shard_args(str(broken / shard), tmp_path, "--dataset-resampled", "--max-consecutive-skips", "30",
                       "--workers", "1")
    assert main(args) == 1
    out, err = capfd.readouterr()
    _one_line_error(err, "30 skips in a row", "--max-consecutive-skips 30", shard, reason)
    assert "ERROR opening" not in err
    assert len(err) < 20_000  # the log lines of a few warnings, not 30 x 3000 bytes of mp4


def test_decord_does_not_print_the_bytes_it_cannot_open(capfd):
    data = _garbage(7, 5000)
    with pytest.raises(VideoDecodeError):
        probe_video(VideoBytes(data, "broken.mp4"))
    err = capfd.readouterr().err
    assert "ERROR opening" not in err and data[:64] not in err.encode("utf-8", "surrogateescape")
    os.write(2, b"stderr is back\n")  # the redirection ended with the read
    assert "stderr is back" in capfd.readouterr().err


def test_malformed_brace_spec_is_a_usage_error_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(_shard_args(f"{tmp_path}/{{00000..00003.tar", tmp_path / "out"))
    assert stopped.value.code == 2
    _one_line_error(capsys.readouterr().err, "--train-data", "Unbalanced braces")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needle", [('{"count": 5, "succ', "JSONDecodeError"),
                                          ('{"count": 5}', "no 'successes' count"),
                                          ('{"successes": "many"}', "not a count")])
def test_bad_stats_json_is_a_usage_error(broken, tmp_path, capsys, text, needle):
    shard = tmp_path / "00000.tar"
    shard.write_bytes((broken / "txt.tar").read_bytes())
    (tmp_path / "00000_stats.json").write_text(text)
    args = _shard_args(str(shard), tmp_path / "out")
    del args[args.index("--train-num-samples"):args.index("--train-num-samples") + 2]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    _one_line_error(capsys.readouterr().err, "00000_stats.json", needle)
    assert not (tmp_path / "out").exists()


def test_max_consecutive_skips_must_be_positive(broken, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(_shard_args(str(broken / "txt.tar"), tmp_path, "--max-consecutive-skips", "0"))
    assert stopped.value.code == 2
    _one_line_error(capsys.readouterr().err, "--max-consecutive-skips")


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def videos(synthetic_videos) -> Path:
    return synthetic_videos(16, seed=0, size=32, frames=12).folder


def _args(videos: Path, out: Path, *extra: str) -> list[str]:
    """tests/train/test_train.py's run (tests/tiny_training.py), without the diagnostics probe."""
    return tiny_training_args(videos, out, "--diagnostics-interval", "0", *extra)


@pytest.fixture(scope="module")
def whole(videos, tmp_path_factory):
    """An uninterrupted 6-step run."""
    return train(_args(videos, tmp_path_factory.mktemp("whole"), "--max-steps", "6", "--save-interval", "2"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.json"])
def test_resume_auto_skips_a_truncated_newest_checkpoint(videos, whole, tmp_path, caplog, damaged):
    first = train(_args(videos, tmp_path, "--max-steps", "6", "--save-interval", "2", "--stop-at-step", "4"))
    assert len(first.losses) == 4
    newest = tmp_path / "checkpoints" / "step_00000004"
    _truncate(newest / damaged)
    with caplog.at_level("WARNING"):
        second = train(_args(videos, tmp_path, "--max-steps", "6", "--save-interval", "2", "--resume", "auto"))
    assert f"checkpoint {newest} is damaged ({damaged} has" in caplog.text
    assert "resuming from step_00000002" in caplog.text
    # from step 2: steps 3-6 again, equal to the uninterrupted run's (tolerances of test_train.py's resume tests)
    assert len(second.losses) == 4
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(whole.losses[2:]), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), second.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records if r["type"] == "resume"] == [str(newest.with_name("step_00000002"))]


def _tiny_checkpoint(root: Path, step: int) -> Path:
    optim = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
             "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.98)}]}
    return ckpt.save_training_checkpoint(root, step, {"w": torch.full((3,), float(step))}, optim,
                                         {"rank0.cpu": torch.get_rng_state()}, {"train": {"step": step}})


def test_manifest_finds_damage_of_the_same_size(tmp_path):
    root = tmp_path / "checkpoints"
    older, newest = _tiny_checkpoint(root, 1), _tiny_checkpoint(root, 2)
    assert json.loads((newest / ckpt.MANIFEST).read_text())["files"].keys() == {
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    assert ckpt.checkpoint_damage(newest) is None and ckpt.resolve_resume("auto", root) == newest
    weights = bytearray((newest / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # a flipped bit in a tensor: safetensors would load it without a word
    (newest / "model.safetensors").write_bytes(bytes(weights))
    assert ckpt.checkpoint_damage(newest) == "model.safetensors does not match its SHA-256 in the manifest"
    assert ckpt.resolve_resume("latest", root) == older
    with pytest.raises(ckpt.TrainingCheckpointError, match="step_00000002: the checkpoint is damaged"):
        ckpt.resolve_resume(str(newest), root)
    (older / ckpt.MANIFEST).write_text('{"files": {"model.safe')  # a truncated manifest
    with pytest.raises(ckpt.TrainingCheckpointError, match="every checkpoint .* is damaged"):
        ckpt.resolve_resume("auto", root)


def test_every_checkpoint_damaged_refuses_in_one_line(videos, tmp_path, capsys):
    assert main(_args(videos, tmp_path, "--max-steps", "4", "--save-interval", "2", "--stop-at-step", "2")) == 0
    _truncate(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    capsys.readouterr()
    assert main(_args(videos, tmp_path, "--max-steps", "4", "--save-interval", "2", "--resume", "auto")) == 1
    _one_line_error(capsys.readouterr().err, "mugstan-train: error: --resume auto: every checkpoint",
                    "step_00000002: model.safetensors has")
