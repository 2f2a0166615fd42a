"""Compare fine-tuning recipes on ELPV (or any config), side by side, several seeds, through the real loop.

    python bench/recipes.py [--seeds 0 1 2] [--epochs 7] [--only "dtl default"] [--json bench/results/X.json]

  linear probe  : the head trained to convergence on cached features of the frozen backbone (no fine-tuning)
  full, one lr  : everything trainable from the start at one learning rate (AdamW 1e-3), no probe
  dtl default   : the config as shipped (quickstart: LP-FT - probe, then the top groups, then all)
Every arm uses the config's split (written once, by seed 0), backbone, resolution, augmentation
and epoch budget; only the plan differs. Seeds change initialisation, order and augmentation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "linear probe": ["epochs=0", "finetune.probe.enabled=true"],
    "full, one lr": ["finetune.stages=[{epoch: 0, train: all}]", "finetune.decay=1.0", "optim.lr=1e-3",
                     "finetune.probe.enabled=false"],
    "dtl default": [],
}


def versions() -> dict:
    import timm
    import torch

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__, "dtl": sha}


def run_arm(config: str, name: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{name.replace(' ', '_').replace(',', '')}-seed{seed}"
    overrides = [f"output_dir={out}", f"seed={seed}", "wandb.enabled=false", "resume=never"]
    if args.epochs is not None and "epochs=0" not in RECIPES[name]:
        overrides.append(f"epochs={args.epochs}")
    cmd = [sys.executable, "-m", "dtl.train", "--config", config, *overrides, *RECIPES[name], *args.set]
    if out.exists():
        import shutil
        shutil.rmtree(out)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    row = {"recipe": name, "seed": seed, "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd[1:]),
           **{k: s.get(k) for k in ("test/acc", "test/macro_f1", "test/balanced_acc", "test_final/acc",
                                     "test_final/macro_f1", "best_epoch", "val/best_acc")}}
    print(f"done: {name} seed {seed}: test acc {s['test/acc']:.4f} macro-F1 {s['test/macro_f1']:.4f} "
          f"({row['wall_s']:.0f}s)", file=sys.stderr, flush=True)
    return row


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name]
        out[name] = {}
        for key in ("test/acc", "test/macro_f1", "wall_s"):
            vals = [r[key] for r in mine]
            out[name][key] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                              "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument("--only", nargs="*", help="run only these recipes")
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for every recipe")
    p.add_argument("--json", help="write the results here (bench/results/...)")
    args = p.parse_args()
    rows = [run_arm(args.config, name, seed, args) for seed in args.seeds for name in RECIPES
            if not args.only or name in args.only]
    stats = summarize(rows)
    print(f"\n{Path(args.config).name}, seeds {args.seeds} {' '.join(args.set)}")
    print(f"{'recipe':<14} {'test acc (mean ± sd)':>22} {'macro-F1 (mean ± sd)':>22} {'wall s':>7}")
    for name, st in stats.items():
        a, f, w = st["test/acc"], st["test/macro_f1"], st["wall_s"]
        print(f"{name:<14} {a['mean']:>13.4f} ± {a['sd']:.4f} {f['mean']:>13.4f} ± {f['sd']:.4f} {w['mean']:>7.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                        "processor": platform.processor()}, "versions": versions(),
            "rows": rows, "summary": stats}, indent=1))


if __name__ == "__main__":
    main()
