"""One training epoch (timm's `train_one_epoch`): forward, backward, step, schedule, per-step events.

The epoch may start mid-way (a resumed run skips the batches already seen) and may stop mid-way
(preemption or `stop_after_steps`); the caller checkpoints and leaves then.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dtl.device_batches import on_device
from dtl.evaluation import progress_bars_off
from dtl.feature_cache import average_head_grads, head_forward
from dtl.optimization import group_lrs


@dataclass
class EpochStats:
    loss: float = 0.0              # mean over the epoch's samples on all ranks
    acc: float = 0.0
    images: int = 0                # trained in the epoch, all ranks (a resumed epoch: before the stop too)
    seconds: float = 0.0           # training time of the epoch (a resumed epoch: both parts, not the restart)
    first_batch_s: float = 0.0     # from the epoch's start to its first batch: the loader's start-up
    lrs: dict[str, float] = field(default_factory=dict)   # the rates of the epoch's last step
    stopped: bool = False


def mix(run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mixup/cutmix `x` in place; returns the soft targets. timm's Mixup draws from numpy's global
    generator, seeded here by (seed, step, batch): a resumed run mixes exactly as an uninterrupted one."""
    state = run.state
    np.random.seed(zlib.crc32(f"mix/{run.cfg.seed}/{state.step}/{state.batch_in_epoch}".encode()))
    _, target = run.mixup(x, y)  # mixes x in place
    return target


def batches(run, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Callable, bool]]:
    """(inputs, labels, forward, cached) per batch of `epoch`: images through the model, or in a
    head-only stage with the feature cache on, cached backbone features through the head."""
    dev = run.accelerator.device
    if run.features is not None and run.features.applies(epoch):
        forward = head_forward(run)
        for x, y in run.features.batches(epoch, run.state.batch_in_epoch):
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), forward, True
        return
    run.data.resize_train(epoch)
    run.data.train.set_epoch(epoch, skip_batches=run.state.batch_in_epoch, batch_size=run.data.batch_size)
    for x, y, _ in on_device(run.data.loader(run.data.train), dev, run.cfg.model.channels_last, run.data.normalize):
        yield x, y, run.model, False


def train_one_epoch(run, epoch: int) -> EpochStats:
    """Train `epoch` from where `run.state` stands; returns its stats (stopped=True if cut short)."""
    acc, cfg, state = run.accelerator, run.cfg, run.state
    model, optimizer, criterion = run.model, run.optimizer, run.criterion
    run.strategy.train_mode(model, run.plan, run.stage, cfg.finetune.bn_frozen, cfg.finetune.bn_eval)
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)  # the epoch record reports this epoch's (stage's) peak
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    correct = torch.zeros((), dtype=torch.long, device=acc.device)
    seen, t0, stopped, first = 0, time.time(), False, 0.0
    carried = dict(state.epoch_sums) if state.batch_in_epoch else {}
    # resumed after the epoch's last step: that step's rates, not the next one's
    lrs = carried.get("lrs") or group_lrs(optimizer)
    bar = tqdm(total=run.batches_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}", leave=False,
               disable=progress_bars_off(acc))
    for x, y, forward, cached in batches(run, epoch):
        if state.batch_in_epoch >= run.batches_per_epoch:
            break
        first = first or time.time() - t0
        target = y if run.mixup is None else mix(run, x, y)
        with acc.accumulate(model):
            logits = forward(x)
            if isinstance(logits, tuple):  # torchvision Inception in training: (logits, aux_logits)
                logits, aux = logits
                loss = criterion(logits.float(), target) + cfg.model.aux_logits_weight * criterion(aux.float(), target)
            else:
                loss = criterion(logits.float(), target)
            acc.backward(loss)
            if cached and acc.sync_gradients:
                average_head_grads(run)
            if acc.sync_gradients and cfg.optim.clip_grad_norm:
                acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        state.batch_in_epoch += 1
        state.images_seen += len(y) * acc.num_processes
        bar.update(1)
        if not acc.sync_gradients:
            continue
        lrs = group_lrs(optimizer)  # the rates this step used, before the schedule moves on
        run.scheduler.step()
        state.step += 1
        if run.ema is not None:
            run.ema.update(acc.unwrap_model(model), step=state.step)
        if state.step % cfg.log_every_steps == 0:
            run.events.step_end(run, {"train/loss_step": loss.item(), **lrs})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
            state.epoch_sums = epoch_sums(acc, carried, loss_sum, correct, seen, time.time() - t0, lrs)
            run.save_checkpoint()
        if run.preempt.should_stop(state.step) or state.step == cfg.stop_after_steps:
            stopped = True
            break
    bar.close()
    sums = state.epoch_sums = epoch_sums(acc, carried, loss_sum, correct, seen, time.time() - t0, lrs)
    if stopped:  # the checkpoint carries the part trained, so the resumed epoch reports the whole epoch
        return EpochStats(images=sums["images"], seconds=sums["seconds"], first_batch_s=first, lrs=lrs, stopped=True)
    images = max(1, sums["images"])
    return EpochStats(sums["loss"] / images, sums["correct"] / images, sums["images"], sums["seconds"], first, lrs)


def epoch_sums(acc, carried: dict, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, seconds: float,
               lrs: dict) -> dict:
    """The epoch's training so far on all ranks: this process's part reduced, plus what a checkpoint
    carried from before a stop (a collective: every rank calls it at the same step); `lrs` the last step's."""
    return {"loss": carried.get("loss", 0.0) + float(acc.reduce(loss_sum, "sum")),
            "correct": carried.get("correct", 0) + int(acc.reduce(correct, "sum")),
            "images": carried.get("images", 0) + seen * acc.num_processes,
            "seconds": carried.get("seconds", 0.0) + seconds, "lrs": lrs}
