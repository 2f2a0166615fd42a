"""The probe stage of LP-FT: the head trained to convergence on cached backbone features.

Why (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"): fine-tuning from a random head sends large, noisy gradients into the
pretrained layers while the head is still wrong; starting the unfreeze from a converged linear
probe (LP-FT) keeps the features and ends better than either. A converged probe costs seconds
once the features are cached: the frozen backbone runs once per sample and view, and the head
then trains for many epochs on tensors, early-stopped on the monitored validation metric with the
best head restored. Its validation result is the first candidate for `best.safetensors`, so a run
is never worse on validation than its own probe.

Views: the clean eval-transform view of every training sample, plus `augmented_views` views made
with the training transform, view v seeded by (seed, v, key) exactly as training epoch v's
augmentation is. Under DDP each rank extracts its own share, the features are gathered, and every
rank trains the same head from the same seed (rank 0's weights are broadcast to be sure).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dtl.backbones import head_name
from dtl.classification_metrics import confusion_update, summarize
from dtl.data_pipeline import build_transform
from dtl.feature_cache import head_inputs
from dtl.parallel_strategy import gather_rows
from dtl.shard_stream import ShardStream, StreamOptions
from dtl.user_errors import DtlError


@dataclass
class ProbeResult:
    epochs: int                 # probe epochs run (early stopping may end them before probe.epochs)
    best_epoch: int             # 1-based
    val: dict[str, float]       # the restored head's validation metrics
    train_views: int            # feature rows per training sample (clean + augmented)
    seconds_features: float
    seconds_train: float


def _features(run, stream: ShardStream, epoch: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (the head's input) of this rank's share of `stream`."""
    if epoch is not None:
        stream.set_epoch(epoch)
    feats, labels = [], []
    for batch in run.data.loader(stream, run.data.eval_batch_size):
        feats.append(head_inputs(run, batch["image"]).cpu())
        labels.append(batch["label"])
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _stream(run, split: str, augmented: bool) -> ShardStream:
    """An exactly-once stream of `split`; with the training transform when `augmented`."""
    base = run.data.train if split == "train" else run.data.val
    opt: StreamOptions = copy.copy(base.opt)
    opt.train, opt.seeded = False, augmented
    transform = build_transform(run.pre, augmented, run.cfg.data.augment)
    return ShardStream(base.source, transform, opt, base.rank, base.world_size, run.data.num_workers)


def cache_identity(run) -> str:
    """What the cached features depend on: backbone, how it is built and its weights, transform, split,
    seed, views, ranks."""
    cfg = run.cfg
    src = {name: (s.source.urls, s.source.counts) for name, s in (("train", run.data.train), ("val", run.data.val))
           if s is not None}
    weights = cfg.model.pretrained
    if isinstance(weights, str) and os.path.isfile(weights):
        weights = f"{weights}:{os.path.getsize(weights)}:{os.path.getmtime(weights)}"
    ident = {"backbone": cfg.model.backbone, "weights": weights, "pre": run.pre, "augment": cfg.data.augment.model_dump(),
             "uint8": cfg.data.normalize_on_device,
             "splits": src, "seed": cfg.seed, "views": cfg.finetune.probe.augmented_views, "label": cfg.data.label_field,
             "world": run.accelerator.num_processes, "format": 1}
    built = {k: getattr(cfg.model, k) for k in ("global_pool", "head_module", "factory_kwargs", "weights_map")}
    ident.update({k: v for k, v in built.items() if v})  # other features (unchanged key at the defaults)
    if cfg.data.augment_on != "workers":  # other pixels in the frozen stages' views (unchanged key otherwise)
        ident["augment_on"], ident["decode_on"] = cfg.data.augment_on, cfg.data.decode_on
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def extract(run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, train labels, val features, val labels), every view, all ranks'.

    Kept in `output_dir/feature_cache/` and reused by a run (or rerun) with the same identity.
    """
    cfg, world = run.cfg.finetune.probe, run.accelerator.num_processes
    path = run.out / "feature_cache" / f"probe-{cache_identity(run)}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return cached["x"], cached["y"], cached["vx"], cached["vy"]
    xs, ys = zip(*[_features(run, _stream(run, "train", v > 0), v - 1 if v > 0 else None)
                   for v in range(1 + cfg.augmented_views)])
    x, y = gather_rows((torch.cat(xs), torch.cat(ys)), world)
    if run.data.val is not None:
        vx, vy = gather_rows(_features(run, _stream(run, "val", False), None), world)
    else:  # no validation split: the head stops on its training metric (train_head)
        vx, vy = x[:0], y[:0]
    if run.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"x": x, "y": y, "vx": vx, "vy": vy}, tmp)
        os.replace(tmp, path)
    return x, y, vx, vy


def _metrics(head: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    with torch.no_grad():
        logits = head(x)
    cm = torch.zeros(n, n, dtype=torch.long)
    confusion_update(cm, logits.argmax(1), y)
    m = summarize(cm)
    m["loss"] = float(F.cross_entropy(logits, y))
    m["samples"] = len(y)
    return m


def train_head(run, x: torch.Tensor, y: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor) -> tuple[nn.Module, int, int, dict]:
    """Fit a copy of the head on features; returns (best head, epochs run, best epoch, its val metrics)."""
    cfg, n = run.cfg.finetune.probe, len(run.classes)
    net = run.accelerator.unwrap_model(run.model)
    head = copy.deepcopy(net.get_submodule(head_name(net))).float().cpu().train()
    if not isinstance(head, nn.Linear):
        raise DtlError(f"finetune.probe needs a Linear head; {run.cfg.model.backbone}'s is {type(head).__name__}")
    criterion = copy.deepcopy(run.criterion).cpu() if run.mixup is None else \
        nn.CrossEntropyLoss(label_smoothing=run.cfg.optim.label_smoothing)  # the probe does not mix
    gen = torch.Generator().manual_seed(run.cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    sign = run.monitor_sign
    best, best_state, best_epoch, best_val, stale, epoch = None, None, 0, {}, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size):
            loss = criterion(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = _metrics(head, vx, vy, n) if len(vy) else _metrics(head, x, y, n)
        score = sign * val[run.monitor_key]
        if best is None or score > best:
            best, best_state, best_epoch, best_val, stale = score, copy.deepcopy(head.state_dict()), epoch, val, 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    return head, epoch, best_epoch, best_val


def install_head(run, head: nn.Module) -> None:
    """Copy the probe's head into the model on every rank (rank 0's, broadcast under DDP)."""
    net = run.accelerator.unwrap_model(run.model)
    target = net.get_submodule(head_name(net))
    with torch.no_grad():
        for p, q in zip(target.parameters(), head.parameters()):
            p.copy_(q.to(p.device, p.dtype))
            if run.accelerator.num_processes > 1 and torch.distributed.is_initialized():
                torch.distributed.broadcast(p.data, src=0)


def run_probe(run) -> ProbeResult:
    """LP-FT's first stage: features once, a converged head, installed in the model; a best-model candidate."""
    import time

    from dtl.run_finish import evaluate_split, export, select_best

    if run.strategy.sharded:
        raise DtlError("finetune.probe is not supported under FSDP yet; set finetune.probe.enabled=false")
    t0 = time.time()
    x, y, vx, vy = extract(run)
    t1 = time.time()
    head, epochs, best_epoch, val = train_head(run, x, y, vx, vy)
    net = run.accelerator.unwrap_model(run.model)
    fresh = copy.deepcopy(net.get_submodule(head_name(net))) if not run.cfg.finetune.probe.install else None
    install_head(run, head)
    t2 = time.time()
    run.state.probe_done = True
    checked = evaluate_split(run, "val")  # the installed model, through the same evaluation as every epoch
    if checked is not None:
        val = checked.metrics
        select_best(run, -1, {"model": val})
    export(run, "probe.safetensors")  # the feature-extractor answer, usable at once whatever is selected later
    if fresh is not None:  # the probe stays a best-model candidate; fine-tuning starts from the fresh head
        install_head(run, fresh)
    result = ProbeResult(epochs, best_epoch, val, len(y), t1 - t0, t2 - t1)
    run.events.probe_end(run, {"epoch": 0, **{f"val/{k}": v for k, v in val.items()}, "probe/epochs": epochs,
                               "probe/best_epoch": best_epoch, "probe/train_rows": len(y),
                               "probe/features_s": t1 - t0, "probe/train_s": t2 - t1})
    return result
