"""Many nodes and restarts on one machine (gloo, loopback): two torchrun "nodes", SLURM ranks without torchrun,
and a worker killed mid-run under torchrun --max-restarts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.video import write_video

from live_process import free_port
from outside_programs import require
from test_shards import write_v2d_shards
from test_train import assert_weights_match_reference
from mugstan_train.post_pretrain import train

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "training" / "post_pretrain.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def videos(synthetic_videos) -> Path:
    return synthetic_videos(16, seed=0, size=32, frames=12).folder


@pytest.fixture(scope="module")
def shards(videos, tmp_path_factory) -> Path:
    """8 shards of 3 usable clips, with failed downloads, a truncated mp4 and a too-short clip among them."""
    out = tmp_path_factory.mktemp("v2d")
    rows = [line.split(",")[:2] for line in (videos / "annotations.csv").read_text().splitlines()[1:]]
    short = out / "short.mp4"
    write_video(short, [np.zeros((32, 32, 3), np.uint8)] * 2, fps=8)
    write_v2d_shards(out / "shards", [(videos / v, c) for v, c in rows], [3] * 8,
                     {1: ["failed"], 4: ["truncated"], 6: ["short", "failed"]}, short)
    return out / "shards"


def _args(data: str, out: Path, *extra: str, root: Path | None = None) -> list[str]:
    return ["--backbone", "tiny", "--train-data", data, *(["--video-root", str(root)] if root else []),
            "--frames", "4", "--batch-size", "2", "--workers", "0", "--output-dir", str(out), "--stan-layers", "2",
            "--warmup-steps", "1", "--log-interval", "1", "--diagnostics-interval", "0", *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run_all(commands: list[tuple[list[str], dict]], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in commands]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outputs)]


def test_two_torchrun_nodes_match_the_one_process_reference(videos, tmp_path):
    steps = 3
    common = ("--max-steps", str(steps), "--drop-path", "0", "--save-interval", "0", "--optimizer", "sgd",
              "--lr-backbone", "1e-2", "--lr-stan", "1e-2", "--weight-decay", "0", "--grad-clip", "0")
    csv = str(videos / "annotations.csv")
    single = train(_args(csv, tmp_path / "one", *common, root=videos) + ["--batch-size", "4"])
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", SCRIPT,
            *_args(csv, tmp_path / "two", *common, root=videos)]
    done = _run_all([(node, ENV), (node, ENV)])
    assert all(d.returncode == 0 for d in done), done[0].stdout[-3000:] + done[1].stdout[-3000:]
    records = _records(tmp_path / "two")
    final = [r for r in records if r["type"] == "final"]
    assert final[0]["world_size"] == 2 and len(set(final[0]["rank_weight_sums"])) == 1
    assert_weights_match_reference(single, tmp_path / "one", tmp_path / "two", steps)


def test_slurm_ranks_without_torchrun_train_over_bad_shards(shards, tmp_path):
    port = free_port()
    commands = []
    for rank in (0, 1):
        env = {**ENV, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(name, None)
        commands.append(([sys.executable, SCRIPT, *_args(f"{shards}/{{00000..00007}}.tar", tmp_path, "--epochs", "2",
                                                         "--train-num-samples", "24", "--workers", "1",
                                                         "--save-interval", "0")], env))
    done = _run_all(commands)
    assert all(d.returncode == 0 for d in done), done[0].stdout[-3000:] + done[1].stdout[-3000:]
    records = _records(tmp_path)
    train_steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_steps] == list(range(1, 13))  # 24 clips / (2 ranks x 2) x 2 epochs
    assert [r for r in records if r["type"] == "final"][0]["world_size"] == 2
    last = train_steps[-1]
    assert last["skipped_decode_error"] >= 1 and last["samples"] == 48
    assert (tmp_path / "final").is_dir()


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", SCRIPT,
           *_args(f"{shards}/{{00000..00007}}.tar", tmp_path, "--max-steps", "6", "--save-every-steps", "2",
                  "--resume", "auto", "--workers", "1")]
    done = subprocess.run(cmd, cwd=REPO, env={**ENV, "MUGSTAN_FAULT_EXIT_AT_STEP": "3"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "rank" in line)[-6000:]
    records = _records(tmp_path)
    resumes = [r for r in records if r["type"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 2 and resumes[0]["restart"] == 1
    after = records[records.index(resumes[0]):]
    assert [r["step"] for r in after if r["type"] == "train"] == [3, 4, 5, 6]  # nothing after step 2 is missing
    assert (tmp_path / "final").is_dir()
    saved = MugStan.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def _video2dataset_writer():
    """video2dataset's own ``WebDatasetSampleWriter`` (absent package: skip, or fail under MUGSTAN_REQUIRE).

    Its ``data_writer`` module needs only fsspec, pyarrow and webdataset; the package's
    ``__init__`` pulls in its downloader (pinned torch 2.1, yt-dlp ...), so the module is loaded
    from its file. CI installs the package with ``pip install --no-deps video2dataset`` (.ci/run).
    """
    path = Path(require("video2dataset")) / "data_writer.py"
    module_spec = importlib.util.spec_from_file_location("video2dataset_data_writer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.WebDatasetSampleWriter


@pytest.mark.requires("video2dataset")
def test_shards_written_by_video2dataset_train_to_the_end_on_two_processes(videos, tmp_path):
    """Shards from video2dataset's writer, with failed downloads (txt + json, no mp4) and a truncated mp4
    in every shard: two torchrun workers train one epoch over the usable clips to the end."""
    import pyarrow as pa

    writer_class = _video2dataset_writer()
    fields = ("url", "caption", "key", "status", "error_message", "videoid", "page_dir")
    schema = pa.schema([pa.field(name, pa.string()) for name in fields] + [pa.field("duration", pa.float64())])
    rows = [line.split(",")[:2] for line in (videos / "annotations.csv").read_text().splitlines()[1:]]
    out = tmp_path / "v2d"
    out.mkdir()
    usable = 0
    for shard in range(4):
        writer = writer_class(shard, str(out), True, 5, schema, {"video": "mp4"})
        for index in range(5):  # 3 downloaded, 1 failed, 1 truncated
            video, caption = rows[(shard * 5 + index) % len(rows)]
            key = f"{shard:05d}{index:04d}"
            data = (videos / video).read_bytes()
            status = "failed_to_download" if index == 3 else "success"
            meta = {"url": f"https://example.invalid/{key}.mp4", "caption": caption, "key": key, "status": status,
                    "error_message": "HTTP Error 404" if index == 3 else None, "videoid": key,
                    "page_dir": "000001_000050", "duration": 1.0}
            streams = {} if index == 3 else {"video": data[:300] if index == 4 else data}
            writer.write(streams, key, caption, meta)
            usable += index < 3
        writer.close()
    assert sorted(p.name for p in out.iterdir())[:2] == ["00000.parquet", "00000.tar"]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           *_args(f"{out}/{{00000..00003}}.tar", run, "--epochs", "1", "--train-num-samples", str(usable),
                  "--workers", "1", "--save-interval", "0")]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    records = _records(run)
    train_steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_steps] == [1, 2, 3]  # 12 usable clips / (2 ranks x batch 2)
    assert [r for r in records if r["type"] == "final"][0]["world_size"] == 2
    assert train_steps[-1]["skipped_no_video"] >= 1 and train_steps[-1]["skipped_decode_error"] >= 1
    assert (run / "final").is_dir()
