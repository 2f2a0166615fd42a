"""CPU time a loader worker spends per training image on each of dtl's data paths: what
`data.augment_on=device` takes off the workers (and `decode_on=device` takes off more).

    python bench/worker_cost.py [--data data/elpv] [--size 224] [--images 600] [--repeats 3] [--json X.json]

One process, one thread, the quickstart's training shards re-encoded as JPEG (quality 95, as
bench/gpu_throughput.py does), each path running `ShardStream._decode` (label, decode or header,
seeded augmentation draws, transform) over the same samples read once into memory:
  workers        timm's training transform (PIL decode, bicubic random-resized crop, flips, uint8 tensor)
  device         CropDraw with decode_on=workers: PIL decode to uint8, crop and flips only drawn
  device_decode  CropDraw with decode_on=device: the JPEG's header read, its bytes kept, crop and flips drawn
The device's half (nvJPEG, roi_align) is not in these numbers: bench/gpu_throughput.py times it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/elpv")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench-worker-cost")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)

    from gpu_throughput import as_jpeg_shards

    from dtl.data_pipeline import build_transform
    from dtl.dataset_index import read_index, split_source
    from dtl.device_augment import CropDraw
    from dtl.run_config import AugmentConfig
    from dtl.shard_stream import ShardStream, StreamOptions, iter_tar_samples

    jpeg = (REPO / args.out).resolve() / "jpeg"
    as_jpeg_shards((REPO / args.data).resolve(), jpeg)
    index = read_index(str(jpeg))
    source = split_source(str(jpeg), "train", index, {}, {})
    samples = [s for url in source.urls for s in iter_tar_samples(url)][:args.images]
    aug = AugmentConfig(hflip=0.5, crop_scale=(0.08, 1.0))  # the GPU bench's augmentation
    pre = {"input_size": (3, args.size, args.size), "interpolation": "bicubic", "mean": (0.5,) * 3,
           "std": (0.5,) * 3, "crop_pct": 1.0}
    paths = {"workers": build_transform(pre, True, aug, uint8=True),
             "device": CropDraw(args.size, aug.crop_scale, aug.crop_ratio, aug.hflip, aug.vflip, aug.rot90, False),
             "device_decode": CropDraw(args.size, aug.crop_scale, aug.crop_ratio, aug.hflip, aug.vflip, aug.rot90, True)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):  # alternating, so the machine's drift hits every path alike
        for name, tf in paths.items():
            stream = ShardStream(source, tf, StreamOptions(classes=index["classes"], train=True, seed=0,
                                                           draft_size=args.size))
            stream._errors = 0
            t = time.perf_counter()
            for s in samples:
                stream._decode(s)
            times[name].append(1e3 * (time.perf_counter() - t) / len(samples))
    ms = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"ms_per_image": round(ms[k], 3), "ms_per_pass": [round(x, 3) for x in times[k]],
                "of_workers_path": round(ms[k] / ms["workers"], 3)} for k in paths}
    for k, r in rows.items():
        print(f"{k:14s} {r['ms_per_image']:7.3f} ms/image  ({r['of_workers_path']:.2f}x the workers path)")
    if args.json:
        write_result(args.json, result_header(settings={k: v for k, v in vars(args).items() if k != "json"},
                                              images=len(samples), paths=rows))


if __name__ == "__main__":
    main()
