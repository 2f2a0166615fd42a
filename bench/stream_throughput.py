"""Images/s of the dtl shard stream against torchvision ImageFolder + DataLoader, same JPEGs.

    python bench/stream_throughput.py [--images 1200] [--size 160] [--workers 2] [--batch 64] [--train]
        [--cold] [--json bench/results/X.json]

Both read the same JPEG files (ELPV cells re-encoded as 300x300 RGB JPEGs, or synthetic images
when elpv-dataset is missing), apply the same timm transform (eval, or with --train the training
augmentation, where the stream also shuffles and seeds each sample) and use the same worker count.
The stream decodes JPEGs with PIL's draft mode at the target size, which ImageFolder cannot.
With --cold (root only) the page cache is dropped before every pass, as when the files sit on
shared storage that this node has not read yet; without it both read from memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from result_header import result_header, write_result


def write_jpegs(root: Path, n: int) -> None:
    try:
        from dtl.shard_writer import ELPV_CLASSES, elpv_records
        records = elpv_records()[:n]
        for r in records:
            d = root / ELPV_CLASSES[r.label]
            d.mkdir(parents=True, exist_ok=True)
            Image.open(r.path).convert("RGB").save(d / f"{r.key}.jpg", quality=95)
    except ImportError:
        import numpy as np
        for i in range(n):
            d = root / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(
                d / f"{i:05d}.jpg", quality=95)


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def rate(loader, n_min: int, cold: bool) -> float:
    if cold:
        drop_page_cache()
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["image"])
    assert n >= n_min, (n, n_min)  # training drops at most (workers x batch) samples
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train", action="store_true", help="training transform, shuffled stream")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each pass (root)")
    p.add_argument("--json", help="write the rates with the command, machine and versions")
    args = p.parse_args()
    import torchvision

    from dtl.data_pipeline import build_transform
    from dtl.run_config import AugmentConfig
    from dtl.shard_stream import ShardStream, StreamOptions, make_loader, read_index, split_source
    from dtl.shard_writer import write_imagefolder

    pre = {"input_size": [3, args.size, args.size], "interpolation": "bilinear", "mean": [0.5] * 3,
           "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}
    transform = build_transform(pre, args.train, AugmentConfig(hflip=0.5, vflip=0.5, crop_scale=[0.7, 1.0]))
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "jpg", Path(tmp) / "shards"
        write_jpegs(folder, args.images)
        write_imagefolder(folder, shards, val_fraction=0, test_fraction=0, maxcount=64)
        n = read_index(str(shards))["splits"]["train"]["count"]
        ifolder = torchvision.datasets.ImageFolder(str(folder), transform=transform)
        baseline = torch.utils.data.DataLoader(ifolder, batch_size=args.batch, num_workers=args.workers, shuffle=True)
        source = split_source(str(shards), "train", read_index(str(shards)), {}, {})
        opts = StreamOptions(classes=ifolder.classes, draft_size=args.size, train=args.train)
        stream = ShardStream(source, transform, opts, num_workers=args.workers)
        ours = make_loader(stream, args.batch, args.workers)
        res = {"ImageFolder": [], "dtl stream": []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            res["ImageFolder"].append(rate(baseline, n, args.cold))
            res["dtl stream"].append(rate(ours, n - args.workers * args.batch if args.train else n, args.cold))
    best = {k: max(v) for k, v in res.items()}
    med = {k: statistics.median(v) for k, v in res.items()}  # the first dtl pass includes its workers' start
    mode = "training transform, shuffled" if args.train else "eval transform"
    mode += ", cold page cache" if args.cold else ", files in page cache"
    print(f"{n} JPEGs 300x300 -> {args.size}px, {mode}, {args.workers} workers, batch {args.batch}, "
          f"best of {args.repeats}")
    for k, v in best.items():
        print(f"{k:<12} {v:8.1f} img/s")
    print(f"ratio dtl/ImageFolder: {best['dtl stream'] / best['ImageFolder']:.2f} (best), "
          f"{med['dtl stream'] / med['ImageFolder']:.2f} (median)")
    if args.json:
        write_result(args.json, result_header(
            images=n, size=args.size, mode=mode, workers=args.workers, batch=args.batch, img_per_s_each_repeat=res,
            best_img_per_s=best, ratio_dtl_over_imagefolder=best["dtl stream"] / best["ImageFolder"],
            median_img_per_s=med, median_ratio=med["dtl stream"] / med["ImageFolder"]))


if __name__ == "__main__":
    main()
