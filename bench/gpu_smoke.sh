#!/usr/bin/env bash
# GPU smoke run: synthetic shards, tf_efficientnet_lite0 (random init), bf16, 3 stages; then step times.
set -euo pipefail
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
from pathlib import Path
import yaml
from conftest import write_imagefolder
from dtl.shard_writer import write_imagefolder as convert
root = Path("/tmp/gpu"); write_imagefolder(root / "img", per_class=200, size=96)
convert(root / "img", root / "shards", maxcount=64)
yaml.safe_dump({"output_dir": "/tmp/gpu/run", "epochs": 3, "mixed_precision": "bf16",
  "data": {"root": "/tmp/gpu/shards", "img_size": 128, "batch_size": 64, "num_workers": 4},
  "model": {"backbone": "tf_efficientnet_lite0", "pretrained": False},
  "finetune": {"stages": [{"epoch": 0, "train": 1}, {"epoch": 1, "train": 3}, {"epoch": 2, "train": "all"}]},
  "wandb": {"enabled": False}, "optim": {"lr": 3e-3}}, open("/tmp/gpu/cfg.yaml", "w"))
PY
python3 -m dtl.train --config /tmp/gpu/cfg.yaml 2>&1 | tr '\r' '\n' | grep -v "it/s\|it \["
python3 bench/step_time.py --size 224 --batch 128 --steps 10
