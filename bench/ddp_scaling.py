"""DDP scaling: N gloo processes against 1 on this machine, the same global batch, all groups
trainable, as img/s per process and scaling efficiency; alternating runs, so a slow spell of a
shared machine hits both.

    python bench/ddp_scaling.py --procs 2 --steps 24 --repeats 2 --json bench/results/ddp_scaling_cpu.json

Each run is a real `dtl train` (torchrun for N > 1) on the quickstart's shards and backbone, one
epoch capped at `--steps` optimizer steps, without probe, validation or test, so the epoch's
`train/img_per_s` (from metrics.jsonl) is the training loop's own rate, data loading included.
On a CPU, N processes share the cores: each gets cores / N threads (dtl's own split).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path


from process_watch import ProcessWatch
from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent


def run(procs: int, args, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)  # the run's log goes beside it
    overrides = [f"output_dir={out}", "epochs=1", f"max_steps_per_epoch={args.steps}",
                 f"data.batch_size={args.global_batch // procs}", "finetune.probe.enabled=false",
                 "finetune.stages=[{epoch: 0, train: all}]", "data.val_split=null", "data.test_split=null",
                 "wandb.enabled=false", "report=false", "checkpoint.keep=1"]
    script = [str(REPO / "dtl" / "train.py"), "--config", args.config, *overrides]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_port", str(29400 + os.getpid() % 500), *script] if procs > 1 else [sys.executable, *script])
    env = {**os.environ, "WANDB_MODE": "disabled"}
    w = ProcessWatch(cmd, out.parent / f"{out.name}.log", env, REPO)
    if w.rc:
        raise SystemExit(f"{procs} process(es) failed: {out.parent / (out.name + '.log')}")
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in rec if "train/img_per_s" in r)
    return {"procs": procs, "img_per_s": epoch["train/img_per_s"], "img_per_s_per_proc": epoch["train/img_per_s"] / procs,
            "epoch_time_s": epoch["epoch_time_s"], "wall_s": w.wall, "peak_rss_gb": w.peak_rss / 2**30,
            "threads_line": next((x for _, x in w.lines if x.startswith("cpu:")), "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/bench-ddp-scaling")
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for r in range(args.repeats):
        for n in (1, args.procs):
            rows.append(run(n, args, REPO / args.out / f"p{n}-{r}"))
            print(json.dumps(rows[-1]), flush=True)
    one = statistics.median(x["img_per_s"] for x in rows if x["procs"] == 1)
    many = statistics.median(x["img_per_s"] for x in rows if x["procs"] == args.procs)
    result = result_header(global_batch=args.global_batch, rows=rows,
                           speedup=many / one, efficiency=many / one / args.procs)
    print(f"1 process {one:.1f} img/s, {args.procs} processes {many:.1f} img/s: "
          f"speedup {many / one:.2f}x, efficiency {many / one / args.procs:.2f}")
    if args.json:
        write_result(args.json, result)


if __name__ == "__main__":
    main()
