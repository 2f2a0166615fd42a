"""Shared fixtures: small real image sets written as real WebDataset shards."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the cores: torch's OpenMP threads sleep when idle instead of spinning on
    # cores the other worker's processes need (set before torch loads; inherited by subprocesses)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Tests that start several training processes or time signals (torchrun, 2-process accelerate,
# Slurm, kills): under pytest-xdist they take turns on one worker, so two of them never share the
# 2 cores their waits are sized for (docs/architecture.md, Tests and benches)
PROCESSES = pytest.mark.xdist_group("processes")

CLASSES = ["circle", "square", "stripes"]


def blank_image(img: Image.Image):
    """A transform for stream tests that check ids, not pixels (top level: forkserver workers unpickle it)."""
    import torch
    return torch.zeros(1)


def image_size(img: Image.Image):
    import torch
    return torch.tensor(img.size)


def make_image(label: int, seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    """A learnable synthetic image: the class decides the shape drawn on noise."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    if label == 0:
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size // 3) ** 2
    elif label == 1:
        mask = (abs(yy - c) < size // 4) & (abs(xx - c) < size // 4)
    else:
        mask = (xx // 4) % 2 == 0
    arr[mask] = [200, 180 - 60 * label, 60 * label]
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_imagefolder(root: Path, per_class: int = 20, size: int = 40) -> Path:
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 4 == 0 else "jpg"
            make_image(label, seed=label * 1000 + i, size=size).save(root / name / f"img_{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("images") / "flat", per_class=24)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, image_folder) -> Path:
    """72 images, 3 classes, split 70/10/20 into shards of 8."""
    from dtl.shard_writer import write_imagefolder as convert

    out = tmp_path_factory.mktemp("shards")
    convert(image_folder, out, val_fraction=0.15, test_fraction=0.2, seed=0, maxcount=8)
    return out


def tiny_config(tmp_path: Path, shard_dir: Path, **extra) -> dict:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "epochs": 3,
        "deterministic": True,
        "data": {"root": str(shard_dir), "img_size": 32, "batch_size": 8, "num_workers": 0,
                 "shuffle_buffer": 16},
        "model": {"backbone": "test_efficientnet", "pretrained": False},
        "finetune": {"stages": [{"epoch": 0, "train": 1}, {"epoch": 1, "train": 3},
                                {"epoch": 2, "train": "all"}]},
        "optim": {"lr": 0.01},
        "wandb": {"enabled": False},
        "log_every_steps": 1,
        # The report redraws curves.png every epoch (about 1.5 s of matplotlib on a 2-core CPU, most
        # of a tiny run's wall): off here, on in the tests of the report and of what reads it.
        "report": False,
    }
    for key, value in extra.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; tests that call train() twice need them fresh."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
