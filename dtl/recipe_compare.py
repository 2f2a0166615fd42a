"""`dtl compare`: feature extractor or fine-tuning? The tutorials' question, answered on your data.

Three arms on the config's split, backbone, resolution, augmentation and epoch budget, each a
real `dtl train` run in its own folder under `--out`:
  linear probe  : the head trained to convergence on cached features of the frozen backbone
  full, one lr  : everything trainable from the start at one learning rate (no probe, no decay)
  your plan     : the config as given
Printed as a table and written to OUT/compare.json (with wall times, machine and versions).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "linear probe": ["epochs=0", "finetune.probe.enabled=true", "finetune.probe.install=true"],
    "full, one lr": ["finetune.stages=[{epoch: 0, train: all}]", "finetune.decay=1.0",
                     "finetune.probe.enabled=false"],
    "your plan": [],
}
METRICS = ("test/acc", "test/macro_f1", "test/balanced_acc", "test_final/acc", "test_final/macro_f1",
           "best_epoch", "val/best_acc", "wall_time_s")


def versions() -> dict:
    """What a compared or benched number came from: Python, torch (and its CUDA), torchvision, timm
    and dtl's commit, `+dirty` when its code had uncommitted changes (results and prose do not
    count: rerunning a bench into a committed JSON is not dirty), `unknown` outside a git checkout."""
    import timm
    import torch
    import torchvision

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git installed
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    code_changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md")
    if sha != "unknown" and code_changed:
        sha += "+dirty"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "dtl": sha}


def run_arm(config: str, arm: str, seed: int, out_root: Path, extra: list[str], full_lr: Optional[float]) -> dict:
    """One arm, one seed, as its own `dtl train` process; returns its summary row."""
    out = out_root / f"{arm.replace(' ', '_').replace(',', '')}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    arm_overrides = ARMS[arm] + ([f"optim.lr={full_lr}"] if arm == "full, one lr" and full_lr else [])
    cmd = [sys.executable, "-m", "dtl.train", "--config", config, f"output_dir={out}", f"seed={seed}",
           "wandb.enabled=false", "resume=never", *extra, *arm_overrides]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=os.getcwd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{arm} (seed {seed}) failed: {r.stderr.strip().splitlines()[-1:]}")
    s = json.loads((out / "summary.json").read_text())
    row = {"arm": arm, "seed": seed, "wall_s": round(time.time() - t0, 1), "command": " ".join(cmd[1:]),
           **{k: s.get(k) for k in METRICS}}
    print(f"  {arm}, seed {seed}: test acc {s['test/acc']:.4f}, macro-F1 {s['test/macro_f1']:.4f} "
          f"({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return row


def stats(rows: list[dict]) -> dict:
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        out[arm] = {}
        for key in ("test/acc", "test/macro_f1", "wall_s"):
            vals = [r[key] for r in mine]
            out[arm][key] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                             "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def table(summary: dict) -> str:
    lines = [f"{'arm':<14} {'test acc (mean ± sd)':>22} {'macro-F1 (mean ± sd)':>22} {'wall s':>7}"]
    for arm, st in summary.items():
        a, f, w = st["test/acc"], st["test/macro_f1"], st["wall_s"]
        lines.append(f"{arm:<14} {a['mean']:>13.4f} ± {a['sd']:.4f} {f['mean']:>13.4f} ± {f['sd']:.4f} {w['mean']:>7.0f}")
    return "\n".join(lines)


def compare(config: str, seeds: list[int], out: str, arms: Optional[list[str]] = None,
            extra: Optional[list[str]] = None, full_lr: Optional[float] = None) -> dict:
    """Run the arms for every seed; write and return compare.json's content."""
    out_root = Path(out)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = [run_arm(config, arm, seed, out_root, extra or [], full_lr)
            for seed in seeds for arm in ARMS if not arms or arm in arms]
    result = {"config": config, "seeds": seeds, "overrides": extra or [],
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                          "gpu": _gpu()}, "versions": versions(), "rows": rows, "summary": stats(rows)}
    (out_root / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def _gpu() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
