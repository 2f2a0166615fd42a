"""configs/elpv_best.yaml over several seeds on one GPU: 4-class and binary test accuracy, wall time.

    python bench/elpv_best.py --seeds 0 1 2 [--parallel 3] [--set finetune.decay=0.8] --json OUT.json

Binary task (as Deitsch et al. 2019 report it): a cell is defective when its defect probability is
>= 0.5, i.e. `likely_defective` or `defective`; the binary numbers collapse the 4-class confusion
matrix of the selected weights (predicted class in the same two groups). With `--parallel N`, N runs
share the GPU at once (each with its own loader workers), so each run's wall time is an upper bound
of a run alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent
DEFECTIVE = (2, 3)  # likely_defective (p = 2/3) and defective (p = 1)


def binary(confusion: list[list[int]]) -> dict:
    cm = torch.tensor(confusion)
    pos = torch.zeros(len(cm), dtype=torch.bool)
    pos[list(DEFECTIVE)] = True
    tp, fn = int(cm[pos][:, pos].sum()), int(cm[pos][:, ~pos].sum())
    fp, tn = int(cm[~pos][:, pos].sum()), int(cm[~pos][:, ~pos].sum())
    return {"acc": (tp + tn) / max(1, tp + tn + fp + fn), "precision": tp / max(1, tp + fp),
            "recall": tp / max(1, tp + fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def launch(args, seed: int, log: Path) -> tuple[subprocess.Popen, float]:
    out = Path(args.out) / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # the bench's own run of this seed: measured afresh
    cmd = [sys.executable, "dtl/train.py", "--config", args.config, f"output_dir={out}", f"seed={seed}",
           f"data.root={args.data}", "wandb.enabled=false", "resume=never", *args.set]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT), time.time()


def row(args, seed: int, wall: float, rc: int, log: Path) -> dict:
    out = Path(args.out) / f"seed{seed}"
    if rc != 0:
        return {"seed": seed, "rc": rc, "log_tail": log.read_text()[-2000:]}
    s = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "rc": 0, "wall_s": round(wall, 1), "best_epoch": s.get("best_epoch"),
            "best_weights": s.get("best_weights"), "test/acc": s["test/acc"], "test/macro_f1": s["test/macro_f1"],
            "test_final/acc": s.get("test_final/acc", s["test/acc"]), "binary": binary(s["test/confusion"]),
            "test/confusion": s["test/confusion"],
            "epochs": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                       if '"train/acc"' in line]}


def spread(vals: list[float]) -> dict:
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/elpv_best.yaml")
    p.add_argument("--data", default="data/elpv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--set", nargs="*", action="extend", default=[], help="overrides (may repeat)")
    p.add_argument("--out", default="runs/bench-elpv-best")
    p.add_argument("--json")
    args = p.parse_args()
    args.out, args.data = str(Path(args.out).resolve()), str(Path(args.data).resolve())
    args.config = str(Path(args.config).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, pending = [], list(args.seeds)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit: keep what the runs logged so far
    try:
        run_all(args, rows, pending)
    finally:
        write(args, rows)


def run_all(args, rows: list[dict], pending: list[int]) -> None:
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        procs = {s: launch(args, s, Path(args.out) / f"seed{s}.log") for s in batch}
        for s, (proc, t0) in procs.items():
            try:
                rc = proc.wait()
            except SystemExit:
                for seed, (other, _) in procs.items():
                    other.kill()
                    metrics = Path(args.out) / f"seed{seed}" / "metrics.jsonl"
                    if seed not in [r["seed"] for r in rows] and metrics.exists():
                        rows.append({"seed": seed, "rc": "stopped by the time limit", "epochs": [
                            json.loads(x) for x in metrics.read_text().splitlines() if '"train/acc"' in x]})
                raise
            rows.append(row(args, s, time.time() - t0, rc, Path(args.out) / f"seed{s}.log"))
            write(args, rows, quiet=True)  # after every seed: a call cut short keeps what finished
            r = rows[-1]
            print(f"seed {s}: " + (f"test acc {r['test/acc']:.4f} macro-F1 {r['test/macro_f1']:.4f} binary acc "
                                   f"{r['binary']['acc']:.4f} best epoch {r['best_epoch']} ({r['best_weights']}) "
                                   f"wall {r['wall_s']:.0f} s" if r["rc"] == 0 else f"FAILED rc={rc}\n{r['log_tail']}"),
                  flush=True)


def write(args, rows: list[dict], quiet: bool = False) -> None:
    ok = [r for r in rows if r["rc"] == 0]
    summary = {k: spread([r[k] for r in ok]) for k in ("test/acc", "test/macro_f1", "test_final/acc", "wall_s")} if ok else {}
    if ok:
        summary["binary/acc"] = spread([r["binary"]["acc"] for r in ok])
        if not quiet:
            print(" | ".join(f"{k} {v['mean']:.4f} ± {v['sd']:.4f}" for k, v in summary.items()))
    result = result_header(config=Path(args.config).read_text(), overrides=args.set, parallel=args.parallel,
                           data=json.loads((Path(args.data) / "dataset.json").read_text()).get("source"),
                           summary=summary, runs=rows)
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
