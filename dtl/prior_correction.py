"""Undo the class prior that `data.balanced_sampling` trains under (Saerens et al. 2002, "Adjusting
the outputs of a classifier to new a priori probabilities"; Menon et al., ICLR 2021, logit adjustment).

Balanced sampling shows class c a share of each epoch proportional to count_c ** (1 - power) instead
of count_c: the rare classes get seen, but the model's softmax then answers for that tilted prior,
over-predicting the rare classes and reporting probabilities a user cannot read as frequencies. By
Bayes' rule the posterior under the real prior adds log(count_c / count_c ** (1 - power)) =
power * log(count_c) to the logits. Evaluation adds it, and exports fold it into the head's output
bias, so `best.safetensors` predicts under the real class frequencies wherever it is loaded.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dtl.run_config import Config


def prior_offset(cfg: Config, class_counts: Optional[list[int]]) -> Optional[torch.Tensor]:
    """Per-class logit offset (mean zero) that maps the sampler's prior back to the data's, or None
    when training sees the real frequencies or `eval.prior_correction` is off."""
    power = cfg.data.balanced_sampling
    if not power or not cfg.eval.prior_correction or not class_counts:
        return None
    logs = torch.tensor([power * math.log(max(1, c)) for c in class_counts], dtype=torch.float32)
    return logs - logs.mean()


def output_bias_key(state_dict: dict[str, torch.Tensor], head: str, num_classes: int) -> Optional[str]:
    """The bias of the head's output layer: the last `HEAD.*bias` with one value per class (or one
    value in all, the binary head's single logit)."""
    keys = [k for k, v in state_dict.items() if (k == f"{head}.bias" or (k.startswith(f"{head}.") and
            k.endswith(".bias"))) and tuple(v.shape) in ((num_classes,), (1,))]
    return keys[-1] if keys else None


def fold_into_bias(state_dict: dict[str, torch.Tensor], head: str, offset: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` whose head predicts with `offset` added to its logits (a binary head's
    single logit z stands for the logits [0, z]: it takes the difference of the two offsets)."""
    key = output_bias_key(state_dict, head, len(offset))
    if key is None:
        raise ValueError(f"no output bias under {head!r} to fold the prior correction into")
    bias = state_dict[key]
    shift = offset if bias.numel() == len(offset) else (offset[1:] - offset[:1])
    return {**state_dict, key: bias + shift.to(bias.device, bias.dtype)}
