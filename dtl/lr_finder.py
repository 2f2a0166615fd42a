"""`dtl lr-find`: fastai's learning-rate range test for one stage of the plan.

The stage's groups train (the others frozen), each at its plan ratio to the head's rate, while
the head's rate grows exponentially from `start_lr` to `end_lr` over at most `steps` batches;
the smoothed loss is recorded and the test stops once it exceeds 4x its minimum. The suggestion
is the rate of steepest descent of the smoothed loss (fastai's `steep`), a point where the loss
still falls fast; `lr_find.png` shows the curve with the suggestion marked. The model is rebuilt
from the config's weights: nothing in the run directory is touched but the plot and its JSON.
"""
from __future__ import annotations

import json
import math
from contextlib import closing
from pathlib import Path
from typing import Optional

import torch

from dtl.run_finish import model_build
from dtl.backbones import create_classifier, preprocessing
from dtl.data_pipeline import build_data, prepare_shards, run_classes
from dtl.dataset_index import DataError
from dtl.device_batches import as_input
from dtl.finetune_plan import FinetunePlan, freeze_batchnorm, set_trainable
from dtl.layer_groups import layer_groups
from dtl.optimization import param_groups, training_loss
from dtl.run_config import Config, ConfigError


def lr_range_test(cfg: Config, stage_index: int = 0, start_lr: float = 1e-7, end_lr: float = 10.0,
                  steps: int = 100, out: Optional[Path] = None) -> dict:
    """Run the range test; returns {lrs, losses, suggested_lr, stage} and writes lr_find.png/json."""
    torch.manual_seed(cfg.seed)
    prepare_shards(cfg.data, cfg.seed)
    classes = run_classes(cfg.data)
    model = create_classifier(cfg.model.backbone, len(classes), cfg.model.pretrained, cfg.model.drop_rate,
                              cfg.model.drop_path_rate, weights_map=cfg.model.weights_map, **model_build(cfg))
    pre = preprocessing(model, cfg.data.img_size, cfg.data.crop_pct)
    groups = layer_groups(model, cfg.finetune.groups, cfg.finetune.group_regex)
    plan = FinetunePlan(cfg.finetune, groups, cfg.optim.lr)
    if not 0 <= stage_index < len(plan.stages):
        raise ConfigError(f"--stage {stage_index}: the plan has stages 0..{len(plan.stages) - 1}")
    stage = plan.stages[stage_index]
    trainable = plan.trainable(stage)
    set_trainable(model, groups, trainable)
    pgs = [pg for pg in param_groups(model, plan, cfg.optim.weight_decay) if trainable[pg["layer_group"]]]
    ratios = [pg["lr"] / plan.group_lrs[-1] for pg in pgs]
    optimizer = torch.optim.AdamW(pgs, lr=start_lr)
    criterion = training_loss(cfg, len(classes))
    with closing(build_data(cfg, pre, classes, 0, 1, error_log=None)) as data:
        lrs, losses = _sweep(model, plan, trainable, data, optimizer, ratios, criterion, start_lr, end_lr, steps, cfg)
    suggested = _steepest(lrs, losses)
    result = {"stage": stage_index, "lrs": lrs, "losses": losses, "suggested_lr": suggested,
              "trainable_groups": [g.name for g, on in zip(groups, trainable) if on]}
    out = Path(out or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "lr_find.png", cfg.model.backbone)
    return result


def _sweep(model, plan, trainable, data, optimizer, ratios, criterion, start_lr, end_lr, steps, cfg):
    gamma = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    if cfg.finetune.bn_frozen or cfg.finetune.bn_eval:
        freeze_batchnorm(model, plan.groups, [False] * len(trainable) if cfg.finetune.bn_eval else trainable)
    step = 0
    while step < steps:
        data.train.set_epoch(step)
        if data.train_batches() == 0:  # no whole batch in a pass: the sweep would never move
            raise DataError(f"split {cfg.data.train_split!r}: {data.train.samples_per_slot()} samples per "
                            f"worker, fewer than data.batch_size = {cfg.data.batch_size}")
        for batch in data.loader(data.train):
            lr = start_lr * gamma ** step
            for pg, r in zip(optimizer.param_groups, ratios):
                pg["lr"] = lr * r
            loss = criterion(model(as_input(batch["image"], torch.device("cpu"), False, data.normalize)).float(),
                             batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            avg = 0.98 * avg + 0.02 * loss.item()
            smoothed = avg / (1 - 0.98 ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            step += 1
            if step >= steps or not math.isfinite(smoothed) or smoothed > 4 * best:
                return lrs, losses
    return lrs, losses


def _steepest(lrs: list[float], losses: list[float], skip_start: int = 10) -> float:
    """The rate where the smoothed loss falls fastest per log-lr (fastai's `steep`), looked for
    between the first `skip_start` steps (the running average is still settling there: its slope
    is an artefact) and the loss's minimum (past it the loss climbs). Too few steps in that span:
    a tenth of the rate at the minimum (fastai's `minimum`)."""
    if len(lrs) < 3:
        return lrs[0] if lrs else float("nan")
    low = min(range(len(losses)), key=losses.__getitem__)
    start = min(skip_start, len(lrs) // 10)
    if low - start < 2:
        return lrs[low] / 10
    logs = [math.log10(x) for x in lrs]
    grads = {i: (losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(max(1, start), low)}
    return lrs[min(grads, key=grads.__getitem__)]


def _plot(result: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(result["lrs"], result["losses"], color="#1f77b4")
    ax.axvline(result["suggested_lr"], color="#d62728", linestyle="--",
               label=f"suggested optim.lr = {result['suggested_lr']:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate of the head (other groups at their plan ratios)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"lr range test: {title}, stage {result['stage']} ({len(result['trainable_groups'])} groups train)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
