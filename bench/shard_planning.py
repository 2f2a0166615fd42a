"""How planning scales: dataset.json with 10 .. 100k shards (up to 1M+ samples), per epoch per rank.

    python bench/shard_planning.py --json bench/results/shard_planning_cpu.json

For each size, writes a synthetic dataset.json (shards of 8..16 samples, no tar files), then
measures on one rank of a 64-rank x 8-worker job: reading and validating the index, building the
split, and the per-epoch plan of every worker slot of the rank (the epoch's seeded shard order
and the shard ranges of each slot: what the stream computes before it opens a shard; opening is
stubbed out). `plan_per_epoch_s` is all 8 worker slots of the rank one after the other;
each DataLoader worker plans its own slot, in parallel, so `plan_per_worker_s` is the latency an
epoch start sees. Memory: tracemalloc's peak while reading the index and planning.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dtl.dataset_index import read_index, split_source, write_index  # noqa: E402
from dtl.shard_stream import ShardStream, StreamOptions  # noqa: E402
from result_header import result_header, write_result


def synthetic_index(root: Path, shards: int) -> int:
    rng = random.Random(0)
    entries = [{"name": f"train-{i:06d}.tar", "count": rng.randint(8, 16)} for i in range(shards)]
    index = {"format": "dtl-webdataset/1", "source": "synthetic", "classes": ["a", "b"],
             "splits": {"train": {"shards": entries, "class_counts": [sum(e["count"] for e in entries), 0]}}}
    write_index(str(root), index)
    return sum(e["count"] for e in entries)


def plan_epoch(source, rank: int, world: int, workers: int, epoch: int) -> int:
    """Shard ranges of every worker slot of `rank` for `epoch`; returns the shards touched."""
    touched = 0
    for w in range(workers):
        s = ShardStream(source, lambda x: x, StreamOptions(classes=["a", "b"], train=True), rank, world, workers)
        s.set_epoch(epoch)
        s._read_shard = lambda url, expected, start=0, stop=None: iter(())  # planning only: no I/O
        order = s._shard_order()
        per = source.total // s.slots
        slot = rank * workers + w
        for _ in s._range(order, slot * per, (slot + 1) * per):
            pass
        touched += 1
    return touched


def measure(shards: int, world: int, workers: int) -> dict:
    world = max(1, min(world, shards // workers))   # a job this size would have; 10 shards: 1 rank
    with tempfile.TemporaryDirectory() as d:
        samples = synthetic_index(Path(d), shards)
        tracemalloc.start()
        t0 = time.perf_counter()
        index = read_index(d)
        source = split_source(d, "train", index, {}, {})
        t1 = time.perf_counter()
        plans = []
        for epoch in range(3):
            t = time.perf_counter()
            plan_epoch(source, world - 1, world, workers, epoch)
            plans.append(time.perf_counter() - t)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"shards": shards, "samples": samples, "world": world, "workers": workers, "index_s": round(t1 - t0, 4),
            "plan_per_epoch_s": round(sum(plans) / len(plans), 4),
            "plan_per_worker_s": round(sum(plans) / len(plans) / workers, 4), "peak_mb": round(peak / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10_000, 100_000])
    p.add_argument("--world", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--json")
    a = p.parse_args()
    rows = [measure(n, a.world, a.workers) for n in a.sizes]
    for r in rows:
        print(json.dumps(r))
    if a.json:
        write_result(a.json, result_header(
            setup={"world": a.world, "workers": a.workers, "rank": a.world - 1},
            goal="plan under 1 s per epoch and under 100 MB per rank at 100k shards", rows=rows))


if __name__ == "__main__":
    main()
