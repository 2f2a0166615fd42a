"""`dataset.json`: the index of a shard set, read, written, validated and interpreted here only.

    {"format": "dtl-webdataset/1", "source": "...", "classes": ["cat", "dog"],
     "splits": {"train": {"shards": [{"name": "train-000000.tar", "count": 128}, ...],
                          "count": 1835, "class_counts": [1000, 835]}, ...}}

Shard names are relative to the folder (or URL prefix) that holds dataset.json, unless they are
URLs or absolute. The index is written last and atomically by whatever writes shards: its
presence means the whole set is complete. Without an index a split can still be given as a
shard pattern plus a sample count (`data.shards`, `data.samples`).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import braceexpand

from dtl.user_errors import DtlError

INDEX_NAME = "dataset.json"
FORMAT = "dtl-webdataset/1"
# Image extensions: of files in an image folder and of the image field of a tar sample.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")


class DataError(DtlError, RuntimeError):
    """A dataset, shard or sample cannot be used; the message names the shard and the key."""


@dataclass
class SplitSource:
    """Where one split lives: shard URLs with their sample counts (None when unknown)."""
    name: str
    urls: list[str]
    counts: Optional[list[int]]
    total: int
    class_counts: Optional[list[int]] = None


def is_local(url: str) -> bool:
    """A path on this machine, not a URL (`scheme://`) or a `pipe:` command."""
    return "://" not in url and not url.startswith("pipe:")


def join_url(base: str, name: str) -> str:
    """`name` relative to `base` (a folder or URL prefix), unless it is absolute or a URL."""
    if "://" in name or name.startswith(("/", "pipe:")):
        return name
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def expand_shards(spec: str, base: str = "") -> list[str]:
    """Brace notation and (local) globs -> a sorted list of shard URLs."""
    urls: list[str] = []
    for item in braceexpand.braceexpand(spec):
        item = join_url(base, item) if base else item
        if is_local(item) and any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"no shard matches {item!r}")
            urls.extend(matches)
        else:
            urls.append(item)
    return urls


def index_path(root: str) -> str:
    return join_url(root, INDEX_NAME)


def read_index(root: str) -> Optional[dict]:
    """dataset.json under `root` (a folder or URL prefix), validated; None if there is none."""
    path = index_path(root)
    if "://" not in path:
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable dataset index ({e})") from None
    else:
        from dtl.shard_fetch import read_bytes

        try:
            data = read_bytes(path)
        except DataError:
            raise
        except Exception:
            return None
        try:
            index = json.loads(data)
        except ValueError as e:
            raise DataError(f"{path}: not a readable dataset index ({e})") from None
    validate_index(index, path)
    return index


def validate_index(index: dict, source: str) -> None:
    """Check the structure the rest of dtl relies on, naming the first thing that is wrong."""
    def bad(what: str) -> DataError:
        return DataError(f"{source}: {what}")

    if not isinstance(index, dict):
        raise bad("top level must be an object")
    classes = index.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise bad(f"'classes' has duplicates: {classes}")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise bad("'splits' must be an object of split name -> shards")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "count" in s
                                                     for s in shards):
            raise bad(f"split {name!r}: 'shards' must be a list of {{name, count}}")
        for s in shards:
            if not isinstance(s["name"], str) or not s["name"]:
                raise bad(f"split {name!r}: shard name {s['name']!r} is not a file name or URL")
            if not _whole(s["count"]):
                raise bad(f"split {name!r}, shard {s['name']!r}: count {s['count']!r} is not a whole number >= 0")
        counts = split.get("class_counts")
        if counts is not None and (not isinstance(counts, list) or not all(_whole(c) for c in counts)):
            raise bad(f"split {name!r}: 'class_counts' must be a list of whole numbers, got {counts!r}")
        if counts is not None and len(counts) != len(classes):
            raise bad(f"split {name!r}: {len(counts)} class counts for {len(classes)} classes")


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def new_index(classes: list[str], source: str) -> dict:
    return {"format": FORMAT, "source": source, "classes": list(classes), "splits": {}}


def add_split(index: dict, split: str, shards: list[dict], class_counts: list[int]) -> None:
    index["splits"][split] = {"shards": shards, "count": sum(int(s["count"]) for s in shards),
                              "class_counts": class_counts}


def write_index(out_dir: str | Path, index: dict) -> Path:
    """Write dataset.json atomically (temporary name, then rename): it marks the set complete."""
    validate_index(index, str(Path(out_dir) / INDEX_NAME))
    out = Path(out_dir)
    tmp = out / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_NAME)
    return out / INDEX_NAME


def split_source(root: str, split: str, index: Optional[dict], patterns: dict[str, str],
                 samples: dict[str, int]) -> SplitSource:
    """Resolve a split from dataset.json, or from a shard pattern plus a stated sample count."""
    if split in patterns:
        urls = expand_shards(patterns[split], base=root)
        if split not in samples:
            raise DataError(f"data.shards.{split} is set but data.samples.{split} is not: "
                            f"state the number of samples in the split (or write a dataset.json)")
        return SplitSource(split, urls, None, samples[split])
    if index is None:
        raise DataError(f"{index_path(root)} not found and data.shards.{split} not set")
    if split not in index.get("splits", {}):
        raise DataError(f"{index_path(root)}: no split {split!r}; it has {sorted(index.get('splits', {}))}")
    entry = index["splits"][split]
    urls = [join_url(root, s["name"]) for s in entry["shards"]]
    counts = [int(s["count"]) for s in entry["shards"]]
    return SplitSource(split, urls, counts, sum(counts), entry.get("class_counts"))


def has_split(split: Optional[str], index: Optional[dict], patterns: dict[str, str]) -> bool:
    return split is not None and (split in patterns or (index is not None and split in index["splits"]))


def resolve_classes(root: str, configured: Optional[list[str]], index: Optional[dict]) -> list[str]:
    """Class names from the config or dataset.json; they must agree when both are given."""
    classes = configured or (index or {}).get("classes")
    if not classes:
        if is_local(root) and not os.path.isdir(root):
            raise DataError(f"{root}: no such folder (the data root: shards and their dataset.json; "
                            f"`dtl shards` writes them)")
        raise DataError(f"no class names: {index_path(root)} is missing and data.classes is not set")
    if index and configured and configured != index["classes"]:
        raise DataError(f"data.classes {configured} differ from {index_path(root)} {index['classes']}")
    return list(classes)
