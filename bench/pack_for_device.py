"""The quickstart's shards re-encoded small enough to travel to a lent GPU machine (64 MiB a call).

    python bench/pack_for_device.py [--data data/elpv] [--out .gpu/elpv_webp] [--quality 95]

Same split, keys, labels and shard names; each PNG becomes a lossy WebP (quality 95: 30 MB instead
of 92 MB for ELPV, mean absolute error 0.8 of 255 grey levels). Every number measured on these
shards says so in its JSON (`data.source` of dataset.json is marked).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dtl.shard_stream import iter_tar_samples  # noqa: E402


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/elpv")
    p.add_argument("--out", default=".gpu/elpv_webp")
    p.add_argument("--quality", type=int, default=95)
    args = p.parse_args()
    src, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "dataset.json").read_text())
    for split in index["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"], "w") as tar:
                for s in iter_tar_samples(str(src / shard["name"])):
                    for field, data in s.items():
                        if field.startswith("__"):
                            continue
                        if field == "png":
                            buf = io.BytesIO()
                            Image.open(io.BytesIO(data)).save(buf, format="WEBP", quality=args.quality)
                            field, data = "webp", buf.getvalue()
                        add(tar, f"{s['__key__']}.{field}", data)
    index["source"] = f"{index.get('source')} (PNG re-encoded as WebP quality {args.quality} to travel)"
    (out / "dataset.json").write_text(json.dumps(index))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
