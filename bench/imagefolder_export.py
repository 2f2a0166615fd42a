"""dtl's shards as an ImageFolder tree, so that timm's train.py and loaders read the same images.

Used by the benches that put dtl beside timm (bench/vs_timm.py, bench/gpu_throughput.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Optional


def export_imagefolder(root: Path, out: Path, splits: Optional[Iterable[str]] = None) -> dict[str, int]:
    """Every sample of `splits` (default: all) as out/SPLIT/LABEL_CLASS/SHARD_KEY.EXT, bytes unchanged.

    Folder names are zero-padded labels, so ImageFolder's sorted order is dtl's class order; file
    names carry the shard's name, so shards listed more than once (same keys) stay distinct. A
    finished tree is marked `.complete` and reused; returns the samples per split."""
    from dtl.shard_stream import iter_tar_samples

    text = (root / "dataset.json").read_text()
    index = json.loads(text)
    source = hashlib.sha256(text.encode()).hexdigest()[:16]  # a tree of other shards is never reused
    wanted = list(splits or index["splits"])
    done = out / ".complete"
    if done.exists():
        try:
            marked = json.loads(done.read_text())
            if isinstance(marked, dict) and marked.pop("source", None) == source and set(wanted) <= set(marked):
                return marked
        except ValueError:
            pass  # an older, empty marker: export again
    shutil.rmtree(out, ignore_errors=True)
    classes = index.get("classes") or []
    counts: dict[str, int] = {}
    for split in wanted:
        n = 0
        for shard in index["splits"][split]["shards"]:
            for s in iter_tar_samples(str(root / shard["name"])):
                ext = next(k for k in s if k in ("png", "jpg", "jpeg", "webp"))
                label = int(s["cls"])
                name = classes[label] if label < len(classes) else "class"
                dst = out / split / f"{label:03d}_{name}" / f"{Path(shard['name']).stem}_{s['__key__']}.{ext}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(s[ext])
                n += 1
        counts[split] = n
    done.write_text(json.dumps({**counts, "source": source}))
    return counts
