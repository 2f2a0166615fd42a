"""Cut a backbone into ordered layer groups: group 0 at the input, the new head last.

timm models use their own `group_matcher` (the one timm's layer decay uses). torchvision models
use the per-family matchers below, written in the same format and grouped by timm's
`group_with_matcher`. Any model can instead be grouped by a list of regexes, one per group.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from dtl.backbones import TORCHVISION_PREFIX, head_name
from dtl.user_errors import DtlError

# torchvision family -> (coarse matcher, fine matcher) in timm's group_matcher format.
_FEATURES = {"features": r"^features\.(\d+)\.", "classifier": r"^classifier\.(\d+)\."}
_FEATURES_FINE = {"features": [(r"^features\.(\d+)\.(\d+)\.", None), (r"^features\.(\d+)\.", None)],
                  "classifier": r"^classifier\.(\d+)\."}
TORCHVISION_MATCHERS: dict[str, tuple[dict, dict]] = {
    "resnet": ({"stem": r"^conv1\.|^bn1\.", "blocks": r"^layer(\d+)\."},
               {"stem": r"^conv1\.|^bn1\.", "blocks": r"^layer(\d+)\.(\d+)\."}),
    "vgg": (_FEATURES, _FEATURES),
    "alexnet": (_FEATURES, _FEATURES),
    "mobilenet_v2": (_FEATURES, _FEATURES_FINE),
    "mobilenet_v3": (_FEATURES, _FEATURES_FINE),
    "efficientnet": (_FEATURES, _FEATURES_FINE),
    "convnext": (_FEATURES, _FEATURES_FINE),
    "vit": ({"embed": r"^class_token|^conv_proj\.|^encoder\.pos_embedding",
             "blocks": r"^encoder\.layers\.encoder_layer_(\d+)\.", "norm": r"^encoder\.ln\."},) * 2,
    "inception_v3": ({"stem": r"^Conv2d_(\d)", "mixed5": r"^Mixed_5", "mixed6": r"^Mixed_6",
                      "mixed7": r"^Mixed_7"},) * 2,
    "densenet": ({"stem": r"^features\.(?:conv0|norm0)\.",
                  "blocks": r"^features\.(?:denseblock|transition)(\d+)\.", "norm": r"^features\.norm5\."},) * 2,
}
_FAMILY_ALIASES = {"resnext": "resnet", "wide_resnet": "resnet"}


class GroupingError(DtlError, ValueError):
    """The model cannot be grouped as asked."""


@dataclass
class LayerGroup:
    index: int
    name: str
    params: list[str]


def torchvision_family(arch: str) -> Optional[str]:
    name = arch.removeprefix(TORCHVISION_PREFIX)
    for prefix in sorted([*TORCHVISION_MATCHERS, *_FAMILY_ALIASES], key=len, reverse=True):
        if name.startswith(prefix):
            return _FAMILY_ALIASES.get(prefix, prefix)
    return None


def _by_regex(names: list[str], regexes: list[str]) -> list[list[str]]:
    compiled = []
    for r in regexes:
        try:
            compiled.append(re.compile(r))
        except re.error as e:
            raise GroupingError(f"finetune.group_regex: {r!r} is not a valid regex: {e}") from None
    groups: list[list[str]] = [[] for _ in regexes]
    unmatched = []
    for n in names:
        for i, rx in enumerate(compiled):
            if rx.search(n):
                groups[i].append(n)
                break
        else:
            unmatched.append(n)
    if unmatched:
        raise GroupingError(f"finetune.group_regex matches no group for {len(unmatched)} parameters, "
                            f"e.g. {unmatched[:5]}")
    empty = [regexes[i] for i, g in enumerate(groups) if not g]
    if empty:
        raise GroupingError(f"finetune.group_regex: {empty} match no parameters")
    return groups


def _by_matcher(names: list[str], matcher: dict) -> list[list[str]]:
    from timm.models._manipulate import group_with_matcher

    grouped = group_with_matcher(((n, None) for n in names), matcher)
    return [grouped[k] for k in sorted(grouped)]


def _by_child(model: nn.Module, names: list[str]) -> list[list[str]]:
    order: dict[str, list[str]] = {}
    for n in names:
        order.setdefault(n.split(".")[0], []).append(n)
    return list(order.values())


def _head_params(model: nn.Module, names: list[str]) -> list[str]:
    """The head's parameters, and those of the norm layers of the module it sits in.

    timm's ConvNeXt (and others with a `head.norm` + `head.fc`) normalise the pooled features
    inside the head module: that norm belongs to the head, so the head-only stage trains it too.
    """
    head = head_name(model)
    own = [n for n in names if n.startswith(head + ".")]
    parent = head.rpartition(".")[0]
    if not parent:
        return own
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    extra = {f"{parent}.{mod_name}.{p}" for mod_name, m in model.get_submodule(parent).named_modules()
             if mod_name and isinstance(m, norms) for p, _ in m.named_parameters(recurse=False)}
    return [n for n in names if n in extra or n in own]


def layer_groups(model: nn.Module, granularity: str = "coarse", regexes: Optional[list[str]] = None) -> list[LayerGroup]:
    """Ordered groups of parameter names; the head (always its own, last group) included."""
    names = [n for n, _ in model.named_parameters()]
    head_params = _head_params(model, names)
    in_head = set(head_params)
    body = [n for n in names if n not in in_head]
    arch = getattr(model, "dtl_arch", "")
    if regexes:
        parts = _by_regex(body, regexes)
    elif hasattr(model, "group_matcher") and not arch.startswith(TORCHVISION_PREFIX):
        parts = _by_matcher(body, model.group_matcher(coarse=granularity == "coarse"))
    elif (family := torchvision_family(arch)) is not None:
        coarse, fine = TORCHVISION_MATCHERS[family]
        parts = _by_matcher(body, coarse if granularity == "coarse" else fine)
    else:
        parts = _by_child(model, body)
    parts = [q for q in parts if q]
    names = [_group_name(p) for p in parts]
    names = [_distinct_name(p, n) if names.count(n) > 1 else n for p, n in zip(parts, names)]
    names = [f"{n}#{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    groups = [LayerGroup(i, n, p) for i, (n, p) in enumerate(zip(names, parts))]
    groups.append(LayerGroup(len(groups), "head", head_params))
    return groups


def _common_prefix(params: list[str]) -> str:
    split = [p.split(".")[:-1] for p in params]
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def _group_name(params: list[str]) -> str:
    """What the group holds: the common module prefix of its parameters, or one such prefix per
    top-level module joined by '+' (`blocks.6+conv_head+bn2`)."""
    prefix = _common_prefix(params)
    if prefix:
        return prefix
    by_top: dict[str, list[str]] = {}
    for p in params:
        by_top.setdefault(p.split(".")[0], []).append(p)
    return "+".join(_common_prefix(ps) or top for top, ps in by_top.items())


def identity_names(groups: list[LayerGroup]) -> list[str]:
    """The grouping as checkpoints record it: each group's plain name (before `_distinct_name`, so
    checkpoints written before names were made distinct still resume), the last one `head`."""
    return [_group_name(g.params) for g in groups[:-1]] + ["head"]


def _distinct_name(params: list[str], name: str) -> str:
    """A name shared by several groups (torchvision's DenseNet splits `features` four ways), made
    distinct by the children it spans: `features.conv0..transition1`, `features.denseblock2+transition2`."""
    depth = len(name.split("."))
    children = list(dict.fromkeys(p.split(".")[depth] for p in params if len(p.split(".")) > depth + 1))
    if not children:
        return name
    span = children[0] if len(children) == 1 else "+".join(children) if len(children) == 2 \
        else f"{children[0]}..{children[-1]}"
    return f"{name}.{span}"


def describe_groups(model: nn.Module, groups: list[LayerGroup]) -> str:
    """The table `dtl groups MODEL` prints: index, name, tensors and parameter count."""
    params = dict(model.named_parameters())
    lines = [f"{'group':>5}  {'params':>12}  {'tensors':>7}  name"]
    for g in groups:
        count = sum(params[n].numel() for n in g.params)
        lines.append(f"{g.index:>5}  {count:>12,}  {len(g.params):>7}  {g.name}")
    lines.append(f"{'':>5}  {sum(p.numel() for p in params.values()):>12,}  total")
    return "\n".join(lines)
