"""The fine-tune plan: which layer groups train in which epoch, and at what learning rate.

Freezing is `requires_grad=False` (no gradient, so no optimizer state) plus eval-mode BatchNorm
in frozen groups, re-applied after every `model.train()` because that call undoes it. Under FSDP
every parameter requires grad and a frozen group is one whose learning rate is 0 (see
`parallel_strategy`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from dtl.layer_groups import LayerGroup
from dtl.run_config import ConfigError, FinetuneConfig, StageConfig, _default_stages


@dataclass(frozen=True)
class Stage:
    index: int
    epoch: int
    first_group: int  # groups [first_group, n_groups) train
    lr_mult: float


class FinetunePlan:
    """Stages resolved against a concrete number of layer groups."""

    def __init__(self, cfg: FinetuneConfig, groups: list[LayerGroup], head_lr: float):
        self.cfg, self.groups = cfg, groups
        n = len(groups)
        written = cfg.stages != _default_stages()  # the default plan adapts to small models; a written one must fit
        for i, s in enumerate(cfg.stages):
            # a written plan asking for more groups than the model has was meant for another backbone: say so
            if written and s.train != "all" and int(s.train) > n:
                raise ConfigError(f"finetune.stages[{i}].train={s.train}: the model has only {n} layer groups "
                                  f"(see `dtl groups MODEL`); use at most {n}, or 'all'")
        self.stages = [Stage(i, s.epoch, self._first_group(s, n), s.lr_mult) for i, s in enumerate(cfg.stages)]
        self.group_lrs = self._group_lrs(cfg, n, head_lr)

    @staticmethod
    def _first_group(stage: StageConfig, n: int) -> int:
        return 0 if stage.train == "all" else max(0, n - int(stage.train))

    @staticmethod
    def _group_lrs(cfg: FinetuneConfig, n: int, head_lr: float) -> list[float]:
        if cfg.group_lrs is not None:
            if len(cfg.group_lrs) != n:
                raise ConfigError(f"finetune.group_lrs has {len(cfg.group_lrs)} values, the model has {n} "
                                 f"layer groups (see `dtl groups MODEL`)")
            return list(cfg.group_lrs)
        if cfg.lr_range is not None:
            low, high = cfg.lr_range
            return [low * (high / low) ** (g / max(1, n - 1)) for g in range(n)]
        return [head_lr * cfg.decay ** (n - 1 - g) for g in range(n)]

    def stage_at(self, epoch: int) -> Stage:
        return [s for s in self.stages if s.epoch <= epoch][-1]

    def trainable(self, stage: Stage) -> list[bool]:
        return [g.index >= stage.first_group for g in self.groups]

    def join_epoch(self, group: int) -> int:
        """First epoch in which `group` trains (a large number if never)."""
        for s in self.stages:
            if group >= s.first_group:
                return s.epoch
        return 1 << 30

    def describe(self, epochs: Optional[int] = None) -> str:
        """The plan as printed at the start of a run, its epochs counted from 1 as the epoch lines are
        (the config's 0-based `epoch` beside them); with `epochs`, stages that start at or after the
        last epoch say they never run, and groups only they would train show as frozen."""
        n = len(self.groups)
        reached = [s for s in self.stages if epochs is None or s.epoch < epochs] or self.stages[:1]
        lines = [f"fine-tune plan: {n} layer groups, {len(self.stages)} stages"]
        for s in self.stages:
            names = [g.name for g in self.groups[s.first_group:]]
            shown = names if len(names) <= 4 else [names[0], "...", *names[-2:]]
            never_runs = "" if s in reached else f" - never runs: epochs={epochs}"
            lines.append(f"  stage {s.index}: from epoch {s.epoch + 1} (finetune.stages epoch {s.epoch}), "
                         f"train {n - s.first_group}/{n} groups "
                         f"({', '.join(shown)}), lr x{s.lr_mult:g}{never_runs}")
        never = min(s.first_group for s in reached)  # groups no stage trains: their rate is never used
        rates = ["frozen" if i < never else f"{lr:.2e}" for i, lr in enumerate(self.group_lrs)]
        lines.append("  group lr: " + ", ".join(f"{g.name}={r}" for g, r in zip(self.groups, rates)))
        return "\n".join(lines)


def set_trainable(model: nn.Module, groups: list[LayerGroup], trainable: list[bool]) -> int:
    """Set requires_grad group by group; returns the number of trainable parameters."""
    params = dict(model.named_parameters())
    for g, on in zip(groups, trainable):
        for name in g.params:
            params[name].requires_grad_(on)
    return count_trainable(model, groups, trainable)


def count_trainable(model: nn.Module, groups: list[LayerGroup], trainable: list[bool]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for g, on in zip(groups, trainable) if on for n in g.params)


def freeze_batchnorm(model: nn.Module, groups: list[LayerGroup], trainable: list[bool]) -> None:
    """Put BatchNorm layers of frozen groups in eval mode (running statistics stay as pretrained)."""
    group_of = {name: g.index for g in groups for name in g.params}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)]
            gid: Optional[int] = next((group_of[p] for p in own if p in group_of), None)
            if gid is not None and not trainable[gid]:
                module.eval()
