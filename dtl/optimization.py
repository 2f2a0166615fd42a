"""Optimizer with one param group per (layer group, decay/no-decay), and the per-group lr schedule.

Every group gets its param groups at the start, frozen or not: a frozen parameter simply has no
gradient, so AdamW keeps no state for it, and schedulers never see groups appear mid-run
(pytorch#79888, Lightning#12141). The schedule is one `LambdaLR` with a function per param group:
    lr = group_lr * warmup(step) * schedule(step) * stage.lr_mult * join_warmup(group, step)   (0 while frozen)
with `schedule` one of cosine, step, multistep, constant, onecycle (`optim.schedule`).
It is a pure function of the step, so a resumed run recomputes exactly the same rates.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dtl.finetune_plan import FinetunePlan
from dtl.ordinal_labels import OrdinalSoftLabelLoss
from dtl.run_config import Config, OptimConfig


def _no_weight_decay(model: nn.Module) -> set[str]:
    """1-D tensors (norms, biases) and whatever the model lists (timm's `no_weight_decay`)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or n in skip}


def param_groups(model: nn.Module, plan: FinetunePlan, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    no_decay = _no_weight_decay(model)
    out = []
    for g, lr in zip(plan.groups, plan.group_lrs):
        for decayed in (True, False):
            names = [n for n in g.params if (n not in no_decay) == decayed]
            if names:
                out.append({"params": [params[n] for n in names], "lr": lr,
                            "weight_decay": weight_decay if decayed else 0.0,
                            "layer_group": g.index, "group_name": g.name})
    return out


def build_optimizer(model: nn.Module, plan: FinetunePlan, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, plan, cfg.weight_decay)
    if cfg.name == "sgd":
        momentum = cfg.effective_momentum()
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=cfg.nesterov and momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, initial_accumulator_value=0.1, eps=1e-7)  # Keras' defaults
    if cfg.name == "rmsprop":  # TensorFlow's rho and epsilon (what Keras recipes were tuned with)
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=0.9, eps=1e-7,
                                   momentum=cfg.effective_momentum())
    return torch.optim.AdamW(groups, lr=cfg.lr)


def schedule_factor(cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """The schedule's multiplier at optimizer step `step`, warmup included, before stages and groups."""
    warmup = cfg.warmup_epochs * steps_per_epoch

    def shape(step: int) -> float:
        epoch = step / steps_per_epoch
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** math.floor(epoch / cfg.step_epochs + 1e-9)
        if cfg.schedule == "multistep":
            return cfg.gamma ** sum(1 for m in cfg.milestones if epoch + 1e-9 >= m)
        if cfg.schedule == "onecycle":  # torch's OneCycleLR (cosine both ways), step for step
            lo = 1 / cfg.onecycle_div
            end = lo / 1e4
            peak = cfg.onecycle_pct * total_steps - 1
            if step <= peak:
                a, b, u = lo, 1.0, step / max(1e-9, peak)
            else:
                a, b, u = 1.0, end, min(1.0, (step - peak) / max(1e-9, total_steps - 1 - peak))
            return b + (a - b) / 2 * (math.cos(math.pi * u) + 1)
        t = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def factor(step: int) -> float:
        if step < warmup:
            ramp = (step + 1) / warmup
            return ramp * (1.0 if cfg.schedule == "cosine" else shape(step))
        return shape(step)
    return factor


def lr_factor(plan: FinetunePlan, cfg: OptimConfig, join_warmup_epochs: float, steps_per_epoch: int,
              total_steps: int, layer_group: int) -> Callable[[int], float]:
    """The multiplier of one param group's base lr at optimizer step `step`."""
    schedule = schedule_factor(cfg, steps_per_epoch, total_steps)
    join_step = plan.join_epoch(layer_group) * steps_per_epoch
    join_warmup = join_warmup_epochs * steps_per_epoch if join_step > 0 else 0

    def factor(step: int) -> float:
        base = schedule(step)
        stage = plan.stage_at(step // steps_per_epoch)
        if layer_group < stage.first_group:
            return 0.0  # frozen in this stage (what keeps it frozen under FSDP, see train.py)
        join = 1.0 if join_warmup == 0 else min(1.0, max(0, step - join_step + 1) / join_warmup)
        return base * stage.lr_mult * join

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, plan: FinetunePlan, cfg: OptimConfig,
                    join_warmup_epochs: float, steps_per_epoch: int, epochs: int) -> LambdaLR:
    total = steps_per_epoch * epochs
    fns = [lr_factor(plan, cfg, join_warmup_epochs, steps_per_epoch, total, pg["layer_group"])
           for pg in optimizer.param_groups]
    return LambdaLR(optimizer, fns)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr of each layer group (decay and no-decay halves share it)."""
    return {f"lr/{pg['layer_group']:02d}_{pg['group_name']}": pg["lr"] for pg in optimizer.param_groups}


def training_loss(cfg: Config, num_classes: int, weights: Optional[torch.Tensor] = None) -> nn.Module:
    """The loss on hard labels: cross-entropy, or with `optim.ordinal_sigma` against ordinal soft labels
    (label smoothing and class weights apply to both)."""
    if cfg.optim.ordinal_sigma:
        return OrdinalSoftLabelLoss(num_classes, cfg.optim.ordinal_sigma, cfg.optim.label_smoothing, weights)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.optim.label_smoothing)
