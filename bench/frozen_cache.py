"""Head-only epochs with and without the feature cache, quickstart backbone and size (CPU).

    pip install -e ".[bench]"
    python bench/frozen_cache.py --json bench/results/frozen_cache_cpu.json

Runs configs/quickstart.yaml with a head-only plan (`finetune.stages=[{epoch: 0, train: 1}]`, no
probe) for `--epochs` epochs, twice, alternating arms in one process tree: `cache_frozen=false`
and `cache_frozen=true cache_views=1`. Reports every epoch's training time (`epoch_time_s`) and
whole time (training + validation + checkpoint, from the metrics.jsonl timestamps), and the
speed-up of the cached epochs after the first (which fills the cache) over the uncached ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent


def run_arm(out: Path, epochs: int, cached: bool, seed: int) -> list[dict]:
    cmd = [sys.executable, "-m", "dtl.cli", "train", "--config", str(REPO / "configs/quickstart.yaml"),
           f"output_dir={out}", f"epochs={epochs}", "finetune.probe.enabled=false",
           "finetune.stages=[{epoch: 0, train: 1}]", f"finetune.cache_frozen={str(cached).lower()}",
           "finetune.cache_views=1", "report=false", "wandb.enabled=false", f"seed={seed}",
           f"data.root={REPO / 'data/elpv'}"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]["time"]
    epochs_ = [r for r in rows if "train/acc" in r]
    out_rows, prev = [], None
    for r in epochs_:
        out_rows.append({"epoch": r["epoch"], "train_s": r["epoch_time_s"],
                         "epoch_s": r["time"] - (prev if prev is not None else first),
                         "val/acc": r["val/acc"], "train/loss": r["train/loss"]})
        prev = r["time"]
    return out_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default="runs/bench-frozen-cache")
    p.add_argument("--json")
    a = p.parse_args()

    arms = {}
    for name, cached in (("uncached", False), ("cached", True)):
        out = Path(a.out) / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t = time.time()
        arms[name] = {"epochs": run_arm(out, a.epochs, cached, 0), "wall_s": time.time() - t}
    unc = arms["uncached"]["epochs"]
    cac = arms["cached"]["epochs"][1:]  # after the fill
    ratio = {k: statistics.mean(e[k] for e in unc) / statistics.mean(e[k] for e in cac) for k in ("train_s", "epoch_s")}
    result = result_header(arms=arms, speedup_after_fill=ratio,
                           note="uncached: every epoch runs the frozen backbone; cached (K=1): epoch 1 fills the "
                                "cache, later epochs train the head on cached features")
    print(json.dumps({"speedup_after_fill": ratio,
                      **{k: [round(e["train_s"], 2) for e in v["epochs"]] for k, v in arms.items()}}, indent=1))
    if a.json:
        write_result(a.json, result)


if __name__ == "__main__":
    main()
