#!/usr/bin/env bash
# FSDP2 on the GPUs of this node (launch/fsdp_vit.yaml): a ViT-S through the 3 unfreeze stages,
# stopped mid-run and resumed from its sharded checkpoint, then the gathered export predicts.
#   bash bench/gpu_fsdp_smoke.sh [num_gpus]
set -euo pipefail
n=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
from pathlib import Path
import yaml
from conftest import write_imagefolder
from dtl.shard_writer import write_imagefolder as convert
root = Path("/tmp/fsdp"); write_imagefolder(root / "img", per_class=200, size=96)
convert(root / "img", root / "shards", maxcount=32)
yaml.safe_dump({"output_dir": "/tmp/fsdp/run", "epochs": 3,
  "data": {"root": "/tmp/fsdp/shards", "img_size": 224, "batch_size": 32, "num_workers": 4},
  "model": {"backbone": "vit_small_patch16_224", "pretrained": False},
  "finetune": {"stages": [{"epoch": 0, "train": 1}, {"epoch": 1, "train": 3}, {"epoch": 2, "train": "all"}]},
  "wandb": {"enabled": False}, "optim": {"lr": 1e-3}, "log_every_steps": 5}, open("/tmp/fsdp/cfg.yaml", "w"))
PY
launch() { accelerate launch --config_file launch/fsdp_vit.yaml --num_processes "$n" dtl/train.py --config /tmp/fsdp/cfg.yaml "$@" 2>&1 | grep -v -i "warn"; }
launch stop_after_steps=20          # stops inside epoch 2/3 (the console's numbering), after the first unfreeze
ls -R /tmp/fsdp/run/checkpoints | head -20
launch                              # resumes (resume=auto) and finishes
python3 -m dtl.cli predict /tmp/fsdp/run/model.safetensors /tmp/fsdp/img/circle/img_000.png /tmp/fsdp/img/stripes/img_001.jpg
