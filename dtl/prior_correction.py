"""Undo the class prior that `data.balanced_sampling` or `data.class_weights` trains under (Saerens
et al. 2002, "Adjusting the outputs of a classifier to new a priori probabilities"; Menon et al.,
ICLR 2021, logit adjustment).

Balanced sampling shows class c a share of each epoch proportional to count_c ** (1 - power) instead
of count_c: the rare classes get seen, but the model's softmax then answers for that tilted prior,
over-predicting the rare classes and reporting probabilities a user cannot read as frequencies. By
Bayes' rule the posterior under the real prior adds log(count_c / count_c ** (1 - power)) =
power * log(count_c) to the logits. Class weights w_c ~ count_c ** -power tilt it the same way: the
weighted loss is minimised by the posterior under a prior ~ count_c * w_c = count_c ** (1 - power),
so the same offset applies. Evaluation adds it, and exports fold it into the head's output bias, so
`best.safetensors` predicts under the real class frequencies wherever it is loaded.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dtl.run_config import Config


def tilt_power(cfg: Config) -> float:
    """How far training tilts the class prior toward equal classes: count ** (1 - this) is the prior the
    model learns (0: the data's own; the config refuses balanced sampling and class weights together)."""
    if cfg.data.balanced_sampling:
        return cfg.data.balanced_sampling
    return cfg.data.class_weight_power if cfg.data.class_weights else 0.0


def corrects_prior(cfg: Config) -> bool:
    """Whether evaluation and exports add a prior correction: training tilts the prior and
    `eval.prior_correction` is on."""
    return bool(tilt_power(cfg)) and cfg.eval.prior_correction


def prior_offset(cfg: Config, class_counts: Optional[list[int]]) -> Optional[torch.Tensor]:
    """Per-class logit offset (mean zero) that maps the training prior (sampler's or class weights')
    back to the data's, or None when training sees the real frequencies or `eval.prior_correction` is off."""
    power = tilt_power(cfg)
    if not corrects_prior(cfg) or not class_counts:
        return None
    logs = torch.tensor([power * math.log(max(1, c)) for c in class_counts], dtype=torch.float32)
    return logs - logs.mean()


def indexed_offset(cfg: Config) -> Optional[torch.Tensor]:
    """`prior_offset` for `cfg` from the training split's class counts in its `dataset.json` (the
    counts a run's sampler uses): for evaluating a run's raw checkpoints outside the run. The index
    is read only when the config tilts the prior with the correction on."""
    if not corrects_prior(cfg):
        return None
    from dtl.dataset_index import DataError, read_index

    split = cfg.data.train_split
    counts = ((read_index(cfg.data.root) or {}).get("splits", {}).get(split) or {}).get("class_counts")
    if not counts:
        raise DataError(f"{cfg.data.root}/dataset.json: no class counts for split {split!r}, which the prior "
                        f"correction needs")
    return prior_offset(cfg, counts)


def output_bias_key(net: nn.Module, head: str, num_classes: int) -> Optional[str]:
    """State-dict key of the bias of the head's output layer (its last Linear, with one output per
    class, or one in all for the binary head's single logit), or None when it has no bias."""
    layers = [(name, m) for name, m in net.get_submodule(head).named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        return None
    name, last = layers[-1]
    if last.bias is None or last.out_features not in (num_classes, 1 if num_classes == 2 else num_classes):
        return None
    return f"{head}.{name}.bias" if name else f"{head}.bias"


def fold_into_bias(state_dict: dict[str, torch.Tensor], key: str, offset: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` whose head predicts with `offset` added to its logits (`key`: the output
    bias, from `output_bias_key`; a binary head's single logit z stands for the logits [0, z]: it
    takes the difference of the two offsets)."""
    bias = state_dict[key]
    shift = offset if bias.numel() == len(offset) else (offset[1:] - offset[:1])
    return {**state_dict, key: bias + shift.to(bias.device, bias.dtype)}
