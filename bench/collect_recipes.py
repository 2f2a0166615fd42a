"""Merge the per-seed runs of `bench/recipes.py` (one folder per arm and seed) into one JSON table.

    python bench/collect_recipes.py runs/bench-q --json bench/results/lpft_quickstart_elpv_cpu.json

Reads each run's summary.json and the command recorded in the per-invocation JSONs; reports mean,
sample standard deviation, min and max per arm (test accuracy, macro-F1, and the final weights').
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from result_header import result_header, write_result

KEYS = ("test/acc", "test/macro_f1", "test/balanced_acc", "test_final/acc", "test_final/macro_f1", "best_epoch",
        "wall_time_s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for run in sorted(Path(args.root).glob("*-seed*")):
        s = run / "summary.json"
        if not s.is_file():
            continue
        summary = json.loads(s.read_text())
        arm, seed = run.name.rsplit("-seed", 1)
        rows.append({"arm": arm.replace("_", " "), "seed": int(seed), **{k: summary.get(k) for k in KEYS}})
    stats = {}
    for arm in sorted({r["arm"] for r in rows}):
        mine = [r for r in rows if r["arm"] == arm]
        stats[arm] = {"seeds": [r["seed"] for r in mine]}
        for k in ("test/acc", "test/macro_f1", "test_final/acc", "test_final/macro_f1"):
            vals = [r[k] if r[k] is not None else r[k.replace("test_final", "test")] for r in mine]
            stats[arm][k] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                             "min": min(vals), "max": max(vals)}
    for arm, st in stats.items():
        print(f"{arm:<14} n={len(st['seeds'])} test acc {st['test/acc']['mean']:.4f} ± {st['test/acc']['sd']:.4f}  "
              f"macro-F1 {st['test/macro_f1']['mean']:.4f} ± {st['test/macro_f1']['sd']:.4f}  | final weights "
              f"acc {st['test_final/acc']['mean']:.4f} ± {st['test_final/acc']['sd']:.4f}")
    if args.json:
        write_result(args.json, result_header(rows=rows, summary=stats))


if __name__ == "__main__":
    main()
