"""Classify images with an exported `model.safetensors`: no training config, no dtl run needed."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dtl.checkpoints import load_exported
from dtl.data_pipeline import build_transform
from dtl.run_config import AugmentConfig


def predict_files(weights: str | Path, images: list[str | Path], top_k: int = 1) -> list[dict]:
    model, meta = load_exported(weights)
    transform = build_transform(meta["preprocessing"], train=False, aug=AugmentConfig())
    classes = meta["classes"]
    results = []
    with torch.no_grad():
        for path in images:
            try:
                img = Image.open(path).convert("RGB")
            except Exception as e:
                raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
            probs = model(transform(img).unsqueeze(0)).softmax(1)[0]
            top = probs.topk(min(top_k, len(classes)))
            results.append({"image": str(path), "predictions": [
                {"class": classes[i], "prob": float(p)} for p, i in zip(top.values, top.indices)]})
    return results
