"""Accuracy, macro-F1 and the confusion matrix, from a confusion matrix summed across ranks."""
from __future__ import annotations

import torch


def confusion_update(cm: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> None:
    """Add a batch to `cm` (rows: true class, columns: predicted class)."""
    n = cm.shape[0]
    cm += torch.bincount(labels.to(cm.device) * n + preds.to(cm.device), minlength=n * n).view(n, n)


def summarize(cm: torch.Tensor) -> dict[str, float]:
    cm = cm.double()
    total = cm.sum()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = cm.sum(1) > 0  # classes absent from the split do not drag macro-F1 down
    return {"acc": float(tp.sum() / total.clamp(min=1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "balanced_acc": float(recall[present].mean()) if present.any() else 0.0}


def format_confusion(cm: torch.Tensor, classes: list[str]) -> str:
    width = max(6, *(len(c) for c in classes))
    head = " " * (width + 2) + " ".join(f"{c[:width]:>{width}}" for c in classes)
    rows = [f"{c[:width]:>{width}}  " + " ".join(f"{int(v):>{width}}" for v in row) for c, row in zip(classes, cm)]
    return "confusion matrix (rows: true, columns: predicted)\n" + "\n".join([head, *rows])
