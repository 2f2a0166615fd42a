"""Heads beyond one Linear layer: an MLP (hidden sizes, activation, dropout) and a single-logit binary head.

The binary head is the tutorials' "one sigmoid output with BCE": its last Linear has one output
`z`, and `BinaryLogit` turns it into the two logits `[0, z]`. softmax([0, z]) = [1 - sigmoid(z),
sigmoid(z)] and cross-entropy on them equals BCE-with-logits on `z`, so training, metrics, the
confusion matrix, reports, `dtl eval` and `dtl predict` need no special case, and the exported
model still carries the single logit (the second column is `z` itself).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "tanh": nn.Tanh}


class BinaryLogit(nn.Module):
    """z -> [0, z]: one sigmoid output seen as two softmax logits (cross-entropy = BCE on z)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(z), z], dim=1)


def build_head(in_features: int, num_classes: int, hidden: list[int], activation: str = "relu",
               dropout: float = 0.0, binary: bool = False) -> nn.Module:
    """Linear, or Linear-act-dropout per hidden size then Linear; binary: one output + BinaryLogit."""
    if binary and num_classes != 2:
        from dtl.backbones import BackboneError

        raise BackboneError(f"model.head.binary needs exactly 2 classes, the data has {num_classes}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, 1 if binary else num_classes))
    if binary:
        layers.append(BinaryLogit())
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def head_spec(hidden: list[int], activation: str, dropout: float, binary: bool) -> Optional[dict]:
    """What an export records to rebuild the head (None: the plain Linear head)."""
    if not hidden and not binary:
        return None
    return {"hidden": list(hidden), "activation": activation, "dropout": dropout, "binary": binary}


def head_in_features(head: nn.Module) -> int:
    """Input width of the head being replaced (its first Linear, or a 1x1 conv's channels)."""
    for m in head.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"no Linear in head {type(head).__name__}")
