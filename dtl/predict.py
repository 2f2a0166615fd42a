"""Classify images with an exported `model.safetensors`: no training config, no dtl run needed.

Files, folders (searched recursively for images) and globs; batched on the chosen device; an
unreadable file gets an error line and the others are still classified.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from dtl.checkpoints import load_exported
from dtl.data_pipeline import build_transform
from dtl.dataset_index import IMAGE_EXTENSIONS, DataError
from dtl.evaluation import predict_logits
from dtl.run_config import AugmentConfig
from dtl.shard_stream import load_rgb
from dtl.user_errors import DtlError


def expand_inputs(items: list[str | Path]) -> list[str]:
    """Files as given; folders -> their images (sorted, recursive); globs -> their matches.

    A folder without images or a glob matching nothing is an error naming it: silence would look
    like a run that classified everything.
    """
    out: list[str] = []
    for item in map(str, items):
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"{item}: a folder with no images (extensions {IMAGE_EXTENSIONS})")
            out += found
        elif any(c in item for c in "*?[") and not p.exists():
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise DataError(f"{item}: no file matches this pattern")
            out += found
        else:
            out.append(item)
    return out


def predict_files(weights: str | Path, images: list[str | Path], top_k: int = 1, batch_size: int = 32,
                  device: Optional[str] = None, tta: str = "none") -> Iterator[dict]:
    """One result per image, in order; an unreadable image yields {"image", "error"} and the rest go on.

    The device, the inputs and the weights are checked before the first result (so before any
    output file is opened); the images are then read lazily.
    """
    dev = _device(device)
    paths = expand_inputs(images)
    model, meta = load_exported(weights)
    return _predict(model, meta, paths, top_k, batch_size, dev, tta)


def _device(name: Optional[str]) -> torch.device:
    """The device asked for, checked: a name torch does not know or a GPU this machine lacks is refused."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DtlError(f"--device {name}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DtlError(f"--device {name}: this machine has no CUDA GPU (torch sees none); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DtlError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DtlError(f"--device {name}: this machine has no Apple GPU (torch sees none); use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise DtlError(f"--device {name}: dtl predicts on cpu, cuda or mps")
    return dev


def _predict(model, meta: dict, paths: list[str], top_k: int, batch_size: int, dev: torch.device,
             tta: str) -> Iterator[dict]:
    model.to(dev)
    transform = build_transform(meta["preprocessing"], train=False, aug=AugmentConfig())
    classes = meta["classes"]
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> Iterator[dict]:
        with torch.no_grad():
            probs = predict_logits(model, torch.stack([t for _, t in pending]).to(dev), tta).float().softmax(1).cpu()
        for (path, _), p in zip(pending, probs):
            top = p.topk(min(top_k, len(classes)))
            yield {"image": path, "predictions": [{"class": classes[i], "prob": float(v)}
                                                  for v, i in zip(top.values, top.indices)]}
        pending.clear()

    for path in paths:
        try:
            with Image.open(path) as img:
                tensor = transform(load_rgb(img))  # as training decodes it (16-bit grey scaled, not clipped)
        except Exception as e:
            yield from flush() if pending else ()
            yield {"image": str(path), "error": f"cannot read image ({type(e).__name__}: {e})"}
            continue
        pending.append((str(path), tensor))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
