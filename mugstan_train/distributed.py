"""Process-group setup from torchrun's or SLURM's environment, and the few collectives the trainer uses.

One process (no RANK in the environment) needs no process group; under
``torchrun`` every process reads RANK / WORLD_SIZE / LOCAL_RANK; under ``srun``
without torchrun they come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and
the master address from MASTER_ADDR or the first host of SLURM_JOB_NODELIST
(docs/training.md, "Many nodes"). NCCL on GPU, gloo on CPU; rank 0 alone writes files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-04,07],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + re.split(r"[-,]", ranges)[0]


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torchrun's variables derived from SLURM's, for ``srun python training/post_pretrain.py`` (one task per GPU).

    Returns nothing when torchrun already set RANK or when SLURM started one task.
    """
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        if "SLURM_JOB_NODELIST" not in env:
            raise RuntimeError("SLURM tasks without torchrun need MASTER_ADDR or SLURM_JOB_NODELIST")
        out["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:  # the same on every task of a job, different between jobs
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def attempt_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store, under a prefix naming torchrun's restart attempt.

    Why: after ``--max-restarts`` restarts a group, the new workers meet in the
    agent's store, which still holds the previous attempt's keys; reading a dead
    worker's address from them made the restarted group fail to connect (seen with
    gloo). Without torchrun, rank 0 hosts the store at MASTER_ADDR:MASTER_PORT.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"mugstan/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str = "auto") -> DistEnv:
    """Reads torchrun's (or SLURM's) environment, picks the device and joins the process group when there are
    several ranks.

    Args:
        device: "auto" (this rank's GPU when CUDA is available, else CPU), "cpu" or "cuda".
    """
    # exported, so that webdataset's node split and the data-loading workers see the same ranks
    os.environ.update(slurm_environment(dict(os.environ)))
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                store=attempt_store(rank, world_size))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sums a few numbers over ranks (float64 so counters stay exact)."""
    if not env.distributed:
        return list(values)
    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable built-ins only: the trainer's own RNG states), in rank order."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
