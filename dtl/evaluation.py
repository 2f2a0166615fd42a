"""Evaluate a split: every sample exactly once across ranks, metrics from the summed confusion matrix.

Besides the metrics, the result keeps what reports need (keys, labels, predictions,
probabilities), gathered on every rank and bounded by `max_samples`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from dtl.classification_metrics import confusion_update, summarize
from dtl.data_pipeline import Data
from dtl.device_batches import on_device
from dtl.parallel_strategy import ParallelStrategy, gather_rows
from dtl.shard_stream import ShardStream

MAX_SAMPLES = 20_000


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]            # acc, macro_f1, balanced_acc, loss, samples
    confusion: torch.Tensor              # rows: true class, columns: predicted
    keys: list[str] = field(default_factory=list)
    labels: Optional[torch.Tensor] = None   # [n]
    probs: Optional[torch.Tensor] = None    # [n, classes], float32 softmax

    @property
    def preds(self) -> Optional[torch.Tensor]:
        return None if self.probs is None else self.probs.argmax(1)


def progress_bars_off(accelerator: Accelerator) -> bool:
    """Progress bars on the local main process of an interactive terminal only, not in job logs."""
    return not (accelerator.is_local_main_process and sys.stderr.isatty())


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The batch and its flips (and quarter turns) that test-time augmentation averages over."""
    if tta == "none":
        return [x]
    views = [x, x.flip(3)]
    if tta in ("flips", "dihedral"):
        views += [x.flip(2), x.flip(2).flip(3)]
    if tta == "dihedral":  # the transposes: a quarter turn of each of the four above
        views += [v.transpose(2, 3) for v in views]
    return views


def predict_logits(net: torch.nn.Module, x: torch.Tensor, tta: str,
                   offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits, or with TTA the log of the softmax averaged over the views (a proper distribution);
    `offset` is added to each view's logits, exactly as an export with it folded into its bias does."""
    def logits(v: torch.Tensor) -> torch.Tensor:
        return net(v) if offset is None else net(v).float() + offset

    if tta == "none":
        return logits(x)
    probs = torch.stack([logits(v).float().softmax(1) for v in tta_views(x, tta)]).mean(0)
    return probs.clamp_min(1e-12).log()


def evaluate(accelerator: Accelerator, strategy: ParallelStrategy, model: torch.nn.Module, data: Data,
             stream: ShardStream, num_classes: int, split: str, input_size: list[int],
             max_samples: int = MAX_SAMPLES, tta: str = "none", cached: Optional[tuple] = None,
             channels_last: bool = False, logit_offset: Optional[torch.Tensor] = None) -> EvalResult:
    """Run `model` over the split; ranks may hold one batch more or less (FSDP ranks join).

    `cached`: (batches, head) to evaluate the head on cached features of a frozen backbone instead
    (the batches hold the features as "image"). `logit_offset`: added to every logit (prior_correction)."""
    net = strategy.eval_module(model) if cached is None else cached[1]
    net.eval()
    dev = accelerator.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    keep = max(0, max_samples // accelerator.num_processes)
    keys: list[str] = []
    labels, probs = [], []
    source = data.loader(stream) if cached is None else cached[0]
    # tqdm.auto's bar calls iter() on what it wraps, then iterates it again: a DataLoader handed to it
    # started its workers twice, and the abandoned first pass decoded (and logged bad samples) in vain
    total = len(source) if isinstance(source, list) else None  # cached batches: the bar knows its end
    batches = on_device(tqdm(iter(source), total=total, desc=split, leave=False,
                             disable=progress_bars_off(accelerator)), dev,
                        channels_last, data.normalize)
    with torch.no_grad():
        while True:
            x, y, batch = next(batches, (None, None, None))
            if not strategy.more_batches(batch is not None):
                break
            if batch is None:  # FSDP: this rank is done, the others still need it in their forwards
                with accelerator.autocast():
                    predict_logits(net, torch.zeros(1, *input_size, device=dev), tta)
                continue
            with accelerator.autocast():
                logits = predict_logits(net, x, tta, logit_offset)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            confusion_update(cm, logits.argmax(1), y)
            room = keep - len(keys)
            if room > 0:
                keys += list(batch["key"][:room])
                labels.append(y[:room].cpu())
                probs.append(logits[:room].float().softmax(1).cpu())
    cm = accelerator.reduce(cm, "sum")
    loss_sum = accelerator.reduce(loss_sum, "sum")
    metrics = summarize(cm.cpu())
    metrics["loss"] = float(loss_sum) / max(1, int(cm.sum()))
    metrics["samples"] = int(cm.sum())
    local = (keys, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
             torch.cat(probs) if probs else torch.zeros(0, num_classes))
    keys, lab, prob = gather_rows(local, accelerator.num_processes)
    return EvalResult(split, metrics, cm.cpu(), keys, lab, prob)
