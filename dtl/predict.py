"""Classify images with an exported `model.safetensors`: no training config, no dtl run needed."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from dtl.checkpoints import load_exported
from dtl.data_pipeline import build_transform
from dtl.run_config import AugmentConfig

BATCH = 32


def predict_files(weights: str | Path, images: list[str | Path], top_k: int = 1) -> Iterator[dict]:
    """One result per image, in order; an unreadable image yields {"image", "error"} and the rest go on."""
    model, meta = load_exported(weights)
    transform = build_transform(meta["preprocessing"], train=False, aug=AugmentConfig())
    classes = meta["classes"]
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> Iterator[dict]:
        with torch.no_grad():
            probs = model(torch.stack([t for _, t in pending])).softmax(1)
        for (path, _), p in zip(pending, probs):
            top = p.topk(min(top_k, len(classes)))
            yield {"image": path, "predictions": [{"class": classes[i], "prob": float(v)}
                                                  for v, i in zip(top.values, top.indices)]}
        pending.clear()

    for path in images:
        try:
            with Image.open(path) as img:
                tensor = transform(img.convert("RGB"))
        except Exception as e:
            yield from flush() if pending else ()
            yield {"image": str(path), "error": f"cannot read image ({type(e).__name__}: {e})"}
            continue
        pending.append((str(path), tensor))
        if len(pending) == BATCH:
            yield from flush()
    if pending:
        yield from flush()
