"""The post-pretraining loop: one step, checkpoint/resume, and the run from start to export (docs/design.md section 3).

Each step encodes this rank's clips and captions, gathers the global batch
inside :func:`mugstan_chat.model.loss.mug_contrastive_loss` (symmetric InfoNCE over
the Mug score matrix), and updates AdamW. A step whose loss or gradient norm is
not finite changes no weight; too many in a row abort the run. Resuming restores
weights, optimiser, schedule, scaler, data position and every rank's RNG, so the
losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from mugstan_chat.model.checkpoint import CheckpointError
from mugstan_chat.model.loss import mug_contrastive_loss
from mugstan_chat.model.dual_encoder import MugStan
from mugstan_chat.model.stan import STAN

from mugstan_train import checkpoints as ckpt
from mugstan_train.data import (ClipSettings, DataError, DecodeFailureMonitor, EvalDataset, GlobalBatchSampler,
                                TrainDataset, build_train_loader, group_ids, read_annotations)
from mugstan_train.diagnostics import TrainingDiagnostics
from mugstan_train.distributed import DistEnv, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed
from mugstan_train.logs import RunLogger
from mugstan_train.optim import build_optimizer, build_scheduler
from mugstan_train.params import columns_from_args, config_from_args
from mugstan_train.shards import (SKIP_REASONS, ShardTrainData, StreamAccount, expand_shards, is_shard_spec,
                                  read_shard_records, readers_check)

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimiser steps taken (skipped non-finite steps included)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0


@dataclass
class TrainResult:
    model: MugStan
    losses: list[float] = field(default_factory=list)  # global loss of every step this process ran
    state: TrainState = field(default_factory=TrainState)
    final_dir: Path | None = None  # None when stopped early (--stop-at-step)
    eval_metrics: dict | None = None


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(ddp_model, model: MugStan, batch: dict, tokenizer, optimizer, scaler, env: DistEnv,
               precision: str, grad_clip: float, task=None) -> tuple[float, float, bool]:
    """One optimisation step on this rank's part of a global batch.

    ``task``: None for post-pretraining (the captions, Mug InfoNCE), else an object whose ``text(batch,
    tokenizer)`` gives the text to encode with the clips and whose ``loss(frames, feats, batch, model, env)``
    returns a loss whose value is the same on every rank (mugstan_train.recognition.RecognitionTask).

    Returns:
        (global loss, gradient norm, True when the update was applied).
    """
    video = batch["video"].to(env.device, non_blocking=True)  # (B, T, 3, H, W)
    text = task.text(batch, tokenizer) if task is not None else tokenizer(batch["captions"])
    with _autocast(env.device, precision):
        frames, feats = ddp_model(video, text.input_ids.to(env.device), text.attention_mask.to(env.device))
    if task is not None:
        loss = task.loss(frames.float(), feats, batch, model, env)
    else:
        loss = mug_contrastive_loss(frames.float(), feats.tokens.float(), feats.mask, feats.pooled.float(),
                                    config=model.config.mug, rank=env.rank, world_size=env.world_size)
    optimizer.zero_grad(set_to_none=True)
    # backward even for a non-finite loss: every rank must take part in DDP's gradient all-reduce
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    loss_value, norm_value = float(loss.detach()), float(norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        scaler.update()  # lowers the fp16 scale when the gradient overflowed
        return loss_value, norm_value, False
    scaler.step(optimizer)
    scaler.update()
    return loss_value, norm_value, True


# --------------------------------------------------------------------------- checkpoints


def _trained_state(model: MugStan) -> dict[str, torch.Tensor]:
    """What a training checkpoint stores: the branch alone when the backbone is frozen."""
    return model.branch_state_dict() if model.config.freeze_backbone else model.state_dict()


def _rng_state(env: DistEnv) -> dict:
    state = {"cpu": torch.get_rng_state().numpy().tobytes()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device).numpy().tobytes()
    return state


def save(model: MugStan, optimizer, scheduler, scaler, monitor: DecodeFailureMonitor, state: TrainState,
         args: argparse.Namespace, env: DistEnv, skipped: Counter | None = None) -> Path | None:
    """Collective: every rank contributes its RNG, failure and skip counts; rank 0 writes."""
    per_rank = all_gather_objects({"rng": _rng_state(env), "monitor": monitor.state_dict(),
                                   "skipped": dict(skipped or {})}, env)
    path = None
    if env.is_main:
        weights = _trained_state(model)
        if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
            raise TrainingDiverged(f"refusing to save non-finite weights at step {state.step}")
        rng = {f"rank{r}.{kind}": torch.frombuffer(bytearray(raw), dtype=torch.uint8)
               for r, item in enumerate(per_rank) for kind, raw in item["rng"].items()}
        extra = {
            "train": state.__dict__, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "monitor": [item["monitor"] for item in per_rank], "skipped": [item["skipped"] for item in per_rank],
            "world_size": env.world_size,
            "batch_size": args.batch_size, "seed": args.seed, "args": vars(args),
        }
        path = ckpt.save_training_checkpoint(Path(args.output_dir) / "checkpoints", state.step, weights,
                                             optimizer.state_dict(), rng, extra, keep=args.keep_checkpoints)
        logger.info("saved checkpoint %s", path)
    barrier(env)
    return path


def initialise_towers(model: MugStan, directory: str | Path, seed: int, keep_stan: bool = False) -> None:
    """Loads the vision and text towers of a saved MugStan (``--init-from``) and rebuilds STAN on them.

    This is the paper's starting point: post-pretraining begins from a *pretrained*
    image-language model, here one the trainer itself produced (e.g. an image-text
    run with ``--no-stan --frames 1``). STAN is rebuilt after loading, seeded by
    ``seed`` (the same on every rank), so its intra-frame modules copy the loaded
    layers; a STAN saved in ``directory`` is ignored, unless ``keep_stan``
    (``--init-stan``): then it is loaded too, to go on from a video-text run with
    another head or other data (not a resume: the optimiser and schedule start afresh).
    """
    source = MugStan.from_pretrained(directory)
    for name in ("vision", "text"):
        try:
            getattr(model, name).load_state_dict(getattr(source, name).state_dict())
        except RuntimeError as error:
            raise CheckpointError(f"--init-from {directory}: its {name} tower does not fit --backbone: "
                                  f"{str(error).splitlines()[0]}") from error
    if keep_stan:
        if source.stan is None or model.stan is None:
            raise CheckpointError(f"--init-stan: {directory} has no STAN branch" if source.stan is None
                                  else "--init-stan with --no-stan: this run has no STAN branch to load into")
        saved, asked = source.stan, model.stan
        if (saved.config.num_layers, saved.fuse_layer) != (asked.config.num_layers, asked.fuse_layer):
            raise CheckpointError(f"--init-stan: {directory} has a {saved.config.num_layers}-layer STAN fused at "
                                  f"layer {saved.fuse_layer}, this run asks for --stan-layers "
                                  f"{asked.config.num_layers} fused at layer {asked.fuse_layer}")
    elif source.stan is not None:
        logger.info("--init-from %s: its STAN branch is ignored (the branch is rebuilt from the loaded tower)",
                    directory)
    if model.stan is not None:
        torch.manual_seed(seed)
        model.stan = STAN(model.vision, model.config.stan)
        if keep_stan:
            model.stan.load_state_dict(source.stan.state_dict())
    logger.info("initialised the vision and text towers%s from %s", " and the STAN branch" if keep_stan else "",
                directory)


def restore(path: Path, model: MugStan, optimizer, scheduler, scaler, monitor: DecodeFailureMonitor,
            args: argparse.Namespace, env: DistEnv, skipped: Counter | None = None) -> TrainState:
    """Loads a training checkpoint into the freshly built run; checks the data layout is the same."""
    loaded = ckpt.load_training_checkpoint(path)
    saved = loaded.state
    if (saved["world_size"], saved["batch_size"], saved["seed"]) != (env.world_size, args.batch_size, args.seed):
        raise ckpt.TrainingCheckpointError(
            f"{path} was written by a run with {saved['world_size']} ranks x batch {saved['batch_size']}, "
            f"seed {saved['seed']}; this run has {env.world_size} x {args.batch_size}, seed {args.seed}. "
            f"Exact resume needs the same layout.")
    saved_group = saved.get("args", {}).get("group_column")
    if saved_group != args.group_column:
        raise ckpt.TrainingCheckpointError(
            f"{path} was written with --group-column {saved_group}, this run has {args.group_column}; "
            f"exact resume needs the same batch order.")
    if model.config.freeze_backbone:
        model.stan.load_state_dict({k[len("stan."):]: v for k, v in loaded.model.items()})
    else:
        model.load_state_dict(loaded.model)
    optimizer.load_state_dict(loaded.optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    monitor.load_state_dict(saved["monitor"][env.rank])
    if skipped is not None:
        skipped.update(saved.get("skipped", [{}] * env.world_size)[env.rank])
    torch.set_rng_state(loaded.rng[f"rank{env.rank}.cpu"])
    if env.device.type == "cuda" and f"rank{env.rank}.cuda" in loaded.rng:
        torch.cuda.set_rng_state(loaded.rng[f"rank{env.rank}.cuda"], env.device)
    logger.info("resumed from %s at step %d", path, saved["train"]["step"])
    return TrainState(**saved["train"])


# --------------------------------------------------------------------------- the run


def _maybe_evaluate(model: MugStan, args: argparse.Namespace, env: DistEnv, state: TrainState,
                    run_logger: RunLogger, task=None) -> dict | None:
    if not args.eval_data:
        return None
    metrics = None
    clip = ClipSettings(frames=args.frames, size=args.image_size or model.image_size)
    if env.is_main and task is not None:  # recognition: top-1/top-5 of the labelled --eval-data
        metrics = task.evaluate(model, args, clip, env.device)
    elif env.is_main:
        from mugstan_train.evaluate import evaluate_retrieval

        if is_shard_spec(args.eval_data):
            records = read_shard_records(expand_shards(args.eval_data, flag="--eval-data"), args.caption_key)
        else:
            records = read_annotations(args.eval_data, columns_from_args(args, "eval_"))
        metrics = evaluate_retrieval(model, records, args.eval_video_root or args.video_root, clip, env.device,
                                     args.eval_batch_size, args.workers, args.precision)
    if env.is_main:
        run_logger.write({"type": "eval", "step": state.step, "epoch": state.epoch, **metrics})
        logger.info("evaluation at step %d: %s", state.step, {k: round(v, 2) for k, v in metrics.items()})
    barrier(env)
    return metrics


def run(args: argparse.Namespace) -> TrainResult:
    """Trains according to ``args`` (see :mod:`mugstan_train.params`); joins the process group under torchrun."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    try:
        return _run(args, env)
    finally:
        cleanup(env)


def _run(args: argparse.Namespace, env: DistEnv) -> TrainResult:
    output = Path(args.output_dir)
    shards = expand_shards(args.train_data, args.train_data_upsampling_factors) \
        if is_shard_spec(args.train_data) else None
    if shards is not None:  # before any model loads
        readers_check(shards, env.world_size, args.workers, args.dataset_resampled)
    if env.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "args.json").write_text(json.dumps(vars(args), indent=2))
    torch.manual_seed(args.seed)  # STAN's fresh modules: the same on every rank
    model = MugStan(config_from_args(args))
    if args.init_from:
        initialise_towers(model, args.init_from, args.seed, keep_stan=args.init_stan)
    task = None  # post-pretraining; --task recognition: the class-name classifier (mugstan_train/recognition.py)
    if getattr(args, "task", "contrastive") == "recognition":
        from mugstan_train.recognition import RecognitionTask

        task = RecognitionTask.from_args(args, model)  # freezes the text tower
    torch.manual_seed(args.seed + env.rank)  # drop-path masks differ between ranks
    np.random.seed(args.seed + env.rank)
    model.gradient_checkpointing = args.grad_checkpointing
    size = args.image_size or model.image_size
    if size != model.image_size:
        raise ValueError(f"--image-size {size} differs from the backbone's {model.image_size}; position "
                         f"embeddings are not interpolated")
    model.to(env.device).train()

    clip = ClipSettings(frames=args.frames, size=size)
    dataset = sampler = stream = None
    if shards is None:
        records = task.train_records(args) if task is not None else read_annotations(args.train_data,
                                                                                     columns_from_args(args))
        dataset = TrainDataset(records, args.video_root, clip, seed=args.seed)
        groups = group_ids(dataset.records, args.group_column) if args.group_column else None
        sampler = GlobalBatchSampler(len(dataset), args.batch_size, env.rank, env.world_size, args.seed,
                                     groups=groups)
        batches_per_epoch = sampler.batches_per_epoch
    else:
        stream = ShardTrainData(shards, clip, batch_size=args.batch_size, world_size=env.world_size,
                                workers=args.workers, num_samples=args.train_num_samples,
                                resampled=args.dataset_resampled, seed=args.seed, caption_key=args.caption_key,
                                max_consecutive_skips=args.max_consecutive_skips)
        batches_per_epoch = stream.batches_per_epoch
    total = args.max_steps or args.epochs * batches_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(0.05 * total)
    optimizer = build_optimizer(model, args.lr_backbone, args.lr_stan, args.weight_decay,
                                kind=args.optimizer)
    scheduler = build_scheduler(optimizer, warmup, total)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")
    monitor = DecodeFailureMonitor(args.max_decode_failure_rate, args.failure_window)
    state = TrainState()
    skipped: Counter = Counter()  # this rank's skipped samples per reason (shards)
    resumed_from = None
    if args.resume:
        path = ckpt.resolve_resume(args.resume, output / "checkpoints")
        if path is None:
            (logger.info if args.resume == "auto" else logger.warning)(
                "--resume %s: nothing to resume in %s%s; starting from scratch", args.resume, output / "checkpoints",
                " (--save-interval 0 writes no checkpoint)" if args.save_interval == 0 else "")
        else:
            state = restore(path, model, optimizer, scheduler, scaler, monitor, args, env, skipped)
            resumed_from = path

    ddp_model = model
    if env.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    tokenizer = model.build_tokenizer()
    diagnostics = _build_diagnostics(model, dataset.records if dataset is not None else None, args, env, clip)
    run_logger = RunLogger(output, env.is_main, total, state.step, args.tensorboard)
    run_logger.write({"type": "start", "step": state.step, "world_size": env.world_size, "total_steps": total,
                      "batches_per_epoch": batches_per_epoch, "data": "shards" if stream is not None else "annotations"})
    if resumed_from is not None:
        run_logger.write({"type": "resume", "step": state.step, "epoch": state.epoch, "checkpoint": str(resumed_from),
                          "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))})
    result = TrainResult(model=model, state=state)
    if task is not None and state.step == 0:  # recognition: the zero-shot start, step 0
        _maybe_evaluate(model, args, env, state, run_logger, task)
    global_batch = args.batch_size * env.world_size
    stop = False
    pin = env.device.type == "cuda"
    account = StreamAccount(skipped)  # shards: the readers' skip counts and tallies, into ``skipped``
    try:
        while state.step < total and not stop:
            if state.batch_in_epoch >= batches_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if stream is None:
                sampler.set_epoch(state.epoch, state.batch_in_epoch)
                loader = build_train_loader(dataset, sampler, args.workers, pin_memory=pin)
            else:  # a resumed pass (batch_in_epoch > 0) re-deals the epoch's shards in a new order
                loader = synchronized(islice(account.batches(stream.loader(state.epoch, state.batch_in_epoch, pin)),
                                             batches_per_epoch - state.batch_in_epoch), env)
            tick = time.perf_counter()
            ran = 0
            for batch in loader:
                ran += 1
                loss, norm, applied = train_step(ddp_model, model, batch, tokenizer, optimizer, scaler, env,
                                                 args.precision, args.grad_clip, task)
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                with warnings.catch_warnings():  # a skipped update still advances the schedule
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                state.step += 1
                state.batch_in_epoch += 1
                fault_exit(state.step, env)
                state.nonfinite_in_a_row = 0 if applied else state.nonfinite_in_a_row + 1
                state.nonfinite_total += 0 if applied else 1
                result.losses.append(loss)
                monitor_error = _check_failures(monitor, batch, env)
                if not applied:
                    logger.warning("step %d: non-finite loss %s / gradient norm %s; update skipped",
                                   state.step, loss, norm)
                    if state.nonfinite_in_a_row >= args.max_nonfinite:
                        raise TrainingDiverged(f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss "
                                               f"or gradient (last at step {state.step}); lower the learning rate "
                                               f"or use bf16 instead of fp16")
                now = time.perf_counter()
                record = {"epoch": state.epoch, "loss": loss, "grad_norm": norm, "lr": next(iter(lrs.values())),
                          **{f"lr_{k}": v for k, v in lrs.items()}, "clips_per_s": global_batch / (now - tick),
                          "decode_failures": monitor.total_failures, "skipped_steps": state.nonfinite_total}
                tick = now
                show = state.step % args.log_interval == 0 or state.step == total
                if stream is not None:
                    if show:  # collective: every rank shows the same steps
                        counts = all_reduce_sum([float(skipped[r]) for r in SKIP_REASONS], env)
                        record.update({f"skipped_{r}": int(c) for r, c in zip(SKIP_REASONS, counts)})
                        record["samples"] = state.step * global_batch
                run_logger.step(state.step, record, show=show)
                if diagnostics is not None and (state.step % args.diagnostics_interval == 0 or state.step == total):
                    run_logger.write({"type": "diagnostics", "step": state.step, **diagnostics.measure(model)})
                if monitor_error:
                    raise DataError(monitor_error)
                epoch_end = state.batch_in_epoch == batches_per_epoch
                stop = args.stop_at_step is not None and state.step >= args.stop_at_step
                # recognition also evaluates at every epoch end; the last step's evaluation follows the loop
                if ((args.eval_interval and state.step % args.eval_interval == 0 or epoch_end and task is not None)
                        and state.step < total):
                    _maybe_evaluate(model, args, env, state, run_logger, task)
                # --save-interval 0: no training checkpoint but the one --stop-at-step needs to resume
                periodic = args.save_interval > 0 and (state.step % args.save_interval == 0 or epoch_end
                                                       or state.step == total)
                if periodic or stop:
                    save(model, optimizer, scheduler, scaler, monitor, state, args, env, skipped)
                if stop or state.step >= total:
                    break
            else:
                if stream is not None and state.batch_in_epoch < batches_per_epoch:
                    _check_stream_end(account, env)
                    if ran == 0:
                        raise DataError(account.no_batch_message(state.epoch, args.batch_size, env.world_size))
                    logger.info("epoch %d: the shards ran out after %d of %d batches on some rank; next epoch",
                                state.epoch, state.batch_in_epoch, batches_per_epoch)
                    state.batch_in_epoch = batches_per_epoch
        if state.step >= total:
            # DDP keeps the ranks' weights equal; a mismatch here would mean a broken all-reduce
            sums = all_gather_objects(sum(float(p.detach().double().sum()) for p in model.parameters()), env)
            run_logger.write({"type": "final", "step": state.step, "world_size": env.world_size,
                              "rank_weight_sums": sums})
            if len(set(sums)) > 1:
                logger.error("the ranks end with different weights (parameter sums %s)", sums)
            result.eval_metrics = _maybe_evaluate(model, args, env, state, run_logger, task)
            if env.is_main:
                result.final_dir = output / "final"
                model.save_pretrained(result.final_dir)
                logger.info("exported %s", result.final_dir)
            barrier(env)
    finally:
        run_logger.close()
    return result


def _build_diagnostics(model: MugStan, records: list | None, args: argparse.Namespace, env: DistEnv,
                       clip: ClipSettings) -> TrainingDiagnostics | None:
    """The fixed probe batch (the first training clips, evaluation sampling), on rank 0 only."""
    if not env.is_main or args.diagnostics_interval <= 0 or args.diagnostics_clips <= 0:
        return None
    if records is None:  # shards: the first usable samples in spec order
        records = read_shard_records(expand_shards(args.train_data, args.train_data_upsampling_factors),
                                     args.caption_key, limit=args.diagnostics_clips)
    records = records[:args.diagnostics_clips]
    probe = EvalDataset(records, args.video_root, clip)
    items = [probe[i] for i in range(len(records))]
    usable = [(item["video"], record.captions[0]) for item, record in zip(items, records) if item["ok"]]
    if not usable:
        logger.warning("diagnostics are off: none of the first %d training clips decodes", len(records))
        return None
    clips = torch.stack([video for video, _ in usable])
    return TrainingDiagnostics(model, clips, [caption for _, caption in usable], env.device)


def _check_failures(monitor: DecodeFailureMonitor, batch: dict, env: DistEnv) -> str | None:
    """Counts this rank's decode failures; returns the abort message when any rank is over the limit."""
    message = None
    try:
        monitor.update(batch["attempts"], batch["failures"])
    except DataError as error:
        message = str(error)
    # collective so every rank stops together
    over = all_reduce_sum([1.0 if message else 0.0], env)[0]
    if over and not message:
        message = "another rank exceeded the video decode failure limit (see its log)"
    return message


def _check_stream_end(account: StreamAccount, env: DistEnv) -> None:
    """Collective, at the end of a shard stream: raises on every rank when a reader of any rank gave up."""
    if all_reduce_sum([1.0 if account.gave_up else 0.0], env)[0]:
        raise DataError(account.gave_up or "a reader on another rank skipped too many samples in a row "
                                           "(see its log)")


def synchronized(batches, env: DistEnv):
    """Yields batches while every rank has one: a stream that runs out on one rank ends the epoch on all
    (uneven shards), instead of leaving the others waiting in a collective."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if all_reduce_sum([0.0 if batch is None else 1.0], env)[0] < env.world_size:
            return
        yield batch


#: Test-only fault injection: the rank named by MUGSTAN_FAULT_RANK (default 1) exits after this step, in the
#: first attempt of a torchrun group only (TORCHELASTIC_RESTART_COUNT 0), to check restarts lose nothing.
FAULT_STEP_VARIABLE = "MUGSTAN_FAULT_EXIT_AT_STEP"


def fault_exit(step: int, env: DistEnv) -> None:
    at = os.environ.get(FAULT_STEP_VARIABLE)
    if (at is not None and step == int(at) and env.rank == int(os.environ.get("MUGSTAN_FAULT_RANK", 1))
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0):
        logger.error("%s=%s: rank %d exits after step %d", FAULT_STEP_VARIABLE, at, env.rank, step)
        os._exit(17)
