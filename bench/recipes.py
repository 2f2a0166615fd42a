"""Compare fine-tuning recipes on ELPV, side by side in one run, through the real training loop.

    python bench/recipes.py [--epochs 7] [--out runs/bench-recipes]

  linear probe  : head only on the frozen backbone, every epoch
  full, one lr  : everything trainable from the start at one learning rate (AdamW 1e-3)
  dtl default   : configs/quickstart.yaml - head first, then the top groups, then all, lr decay per group
All three use the quickstart's split, backbone (EfficientNet-Lite0, offline ImageNet weights),
resolution, augmentation and epochs; only the plan differs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "linear probe": ["finetune.stages=[{epoch: 0, train: 1}]"],
    "full, one lr": ["finetune.stages=[{epoch: 0, train: all}]", "finetune.decay=1.0", "optim.lr=1e-3"],
    "dtl default": [],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument("--only", nargs="*", help="run only these recipes")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every recipe")
    args = p.parse_args()
    rows = []
    for name, overrides in RECIPES.items():
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / name.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "dtl.train", "--config", str(REPO / "configs" / "quickstart.yaml"),
               f"output_dir={out}", f"epochs={args.epochs}", "wandb.enabled=false", *overrides, *args.set]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        s = json.loads((out / "summary.json").read_text())
        rows.append((name, s["test/acc"], s["test/macro_f1"], s["val/best_acc"], time.time() - t0))
        print(f"done: {name}: test acc {s['test/acc']:.4f}", file=sys.stderr)
    print(f"\nELPV, 4 classes, tf_efficientnet_lite0, {args.epochs} epochs, test split {' '.join(args.set)}")
    print(f"{'recipe':<14} {'test acc':>9} {'macro-F1':>9} {'best val':>9} {'wall s':>7}")
    for name, acc, f1, val, wall in rows:
        print(f"{name:<14} {acc:>9.4f} {f1:>9.4f} {val:>9.4f} {wall:>7.0f}")
    base = {r[0]: r[1] for r in rows}
    if "dtl default" in base:
        for other in ("linear probe", "full, one lr"):
            if other in base:
                print(f"dtl default - {other}: {100 * (base['dtl default'] - base[other]):+.1f} points")


if __name__ == "__main__":
    main()
