"""Soft labels for classes that are ordered levels (SORD: Díaz & Marathe, CVPR 2019, "Soft Labels for
Ordinal Regression").

Grades of one quantity (ELPV's defect probabilities 0, 1/3, 2/3, 1; severity or age bins) are
judged by people who disagree by a level far more often than by two. Plain cross-entropy punishes
"likely defective" for a defective cell as hard as "functional"; these targets put mass on the
neighbouring levels, exp(-(i - j)^2 / (2 sigma^2)) normalised, so the model learns the order. The
classes' order is `data.classes` (or the dataset's). Label smoothing mixes in on top.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def ordinal_targets(num_classes: int, sigma: float, smoothing: float = 0.0) -> torch.Tensor:
    """Row t: the soft target of true level t (each row sums to 1)."""
    levels = torch.arange(num_classes, dtype=torch.float32)
    q = torch.exp(-(levels[:, None] - levels[None, :]) ** 2 / max(2 * sigma ** 2, 1e-30))  # a tiny sigma: one-hot, not 0/0
    q = q / q.sum(1, keepdim=True)
    return (1 - smoothing) * q + smoothing / num_classes


class OrdinalSoftLabelLoss(nn.Module):
    """Cross-entropy against `ordinal_targets` of the hard labels; with class `weight`, each sample
    weighs its true class's weight and the batch takes the weighted mean (nn.CrossEntropyLoss does
    the same without label smoothing; with it, torch weighs the smoothing term by each other class's
    weight instead). Move it to the logits' device (`.to`), like any module with buffers."""

    def __init__(self, num_classes: int, sigma: float, smoothing: float = 0.0,
                 weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("targets", ordinal_targets(num_classes, sigma, smoothing))
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_sample = -(self.targets[labels] * logits.log_softmax(-1)).sum(-1)
        if self.weight is None:
            return per_sample.mean()
        w = self.weight[labels]
        return (per_sample * w).sum() / w.sum()
