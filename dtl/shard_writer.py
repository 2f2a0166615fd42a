"""Write labelled images as WebDataset tar shards plus a `dataset.json` index.

Images are stored as their original encoded bytes (no re-encoding, no quality loss). Each
shard is written to a temporary name and renamed when complete, and `dataset.json` is
written last: its presence means the whole set of shards is complete.
"""
from __future__ import annotations

import csv
import os
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import webdataset as wds

from dtl.dataset_index import (IMAGE_EXTENSIONS, INDEX_NAME, DataError, add_split, is_local,  # noqa: F401
                               new_index, write_index)


@dataclass(frozen=True)
class Record:
    key: str          # unique within the dataset, no dots (WebDataset splits fields at the first dot)
    path: Path        # encoded image file
    label: int
    meta: Optional[dict] = None


def stratified_split(records: list[Record], fractions: dict[str, float], seed: int) -> dict[str, list[Record]]:
    """Split per class with a seeded shuffle, so every split keeps the class balance."""
    rest = [name for name, f in fractions.items() if f > 0]
    out: dict[str, list[Record]] = {"train": [], **{name: [] for name in rest}}
    by_class: dict[int, list[Record]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    rng = random.Random(seed)
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda r: r.key)
        rng.shuffle(items)
        start = 0
        for name in rest:
            n = round(len(items) * fractions[name])
            out[name].extend(items[start:start + n])
            start += n
        out["train"].extend(items[start:])
    for name in rest:
        if not out[name]:  # rounded to no image in every class: a split asked for, silently absent
            sizes = sorted(len(v) for v in by_class.values())
            raise DataError(f"the {name} fraction {fractions[name]:g} rounds to no image in any class (classes of "
                            f"{sizes[0]}-{sizes[-1]} images): the {name} split would be empty; raise it, or set it "
                            f"to 0 to go without")
    for name in out:
        rng.shuffle(out[name])
    return out


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """A stratified split needs fractions in [0, 1) that leave some images for training."""
    for name, f in (("--val", val_fraction), ("--test", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} {f}: a split fraction must be at least 0 and below 1")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"--val {val_fraction} and --test {test_fraction} leave no images for training "
                        f"(their sum must be below 1)")


def _open_error(path: Path) -> Optional[str]:
    """Why `path` does not decode as an image (None when it does); JPEGs decode at draft scale."""
    from PIL import Image

    from dtl.shard_stream import load_rgb

    try:
        with Image.open(path) as img:
            load_rgb(img, 64)
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"
    return None


def check_images(records: list[Record], threads: int = 0) -> None:
    """Decode every image before a shard is written: a bad file is named now, not hours into training.

    PIL releases the GIL while decoding, so threads use every core. Raises one DataError naming the
    first bad file, with how many more there are.
    """
    threads = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        errors = [(r.path, e) for r, e in zip(records, pool.map(lambda r: _open_error(r.path), records)) if e]
    if errors:
        path, why = errors[0]
        more = f" (and {len(errors) - 1} more bad images: {', '.join(str(p) for p, _ in errors[1:4])}" \
               f"{', ...' if len(errors) > 4 else ''})" if len(errors) > 1 else ""
        raise DataError(f"{path}: not a readable image ({why}){more}; nothing was written. Remove or fix it "
                        f"and run again")


def check_out_dir(out: Path) -> None:
    """Shards go only into a missing or empty folder, so no run's data changes under it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "holds a dataset (dataset.json)" if (out / INDEX_NAME).is_file() else "is not an empty folder"
        raise DataError(f"{out} {what}: shards are written only into a missing or empty folder, so runs "
                        f"that read a dataset keep reading the same one; choose another output folder")


def _write_split(records: list[Record], out_dir: Path, split: str, maxcount: int) -> list[dict]:
    shards = []
    for i in range(0, len(records), maxcount):
        name = f"{split}-{i // maxcount:06d}.tar"
        tmp = out_dir / f".{name}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for r in records[i:i + maxcount]:
                sample = {"__key__": r.key, r.path.suffix.lstrip(".").lower(): r.path.read_bytes(), "cls": r.label}
                if r.meta:
                    sample["json"] = r.meta
                sink.write(sample)
        os.replace(tmp, out_dir / name)
        shards.append({"name": name, "count": len(records[i:i + maxcount])})
    return shards


def write_dataset(splits: dict[str, list[Record]], classes: list[str], out_dir: str | Path,
                  maxcount: int = 128, source: str = "") -> dict:
    """Check every image, then write every split as shards and then the index; returns the index."""
    out = Path(out_dir)
    check_out_dir(out)
    check_images([r for records in splits.values() for r in records])
    out.mkdir(parents=True, exist_ok=True)
    index = new_index(classes, source)
    for split, records in splits.items():
        if not records:
            continue
        counts = [0] * len(classes)
        for r in records:
            counts[r.label] += 1
        add_split(index, split, _write_split(records, out, split, maxcount), counts)
    write_index(out, index)
    return index


def _safe_key(text: str) -> str:
    return text.replace(".", "_").replace("/", "_").replace(" ", "_")


def unique_keys(paths: list[Path], root: Path) -> list[str]:
    """A sample key per file, unique within the dataset.

    The key is the relative path without extension, with '.', '/' and ' ' made '_'. Files that
    would share one (`a/img0.png` and `a/img0.jpg`, `my img.png` and `my_img.png`) keep their
    extension, then a counter: every image stays a sample of its own.
    """
    base = [_safe_key(str(p.relative_to(root).with_suffix(""))) for p in paths]
    clashes = {k for k in base if base.count(k) > 1} if len(set(base)) != len(base) else set()
    keys, used = [], set()
    for p, k in zip(paths, base):
        if k in clashes:
            k = f"{k}_{p.suffix.lstrip('.').lower()}" if p.suffix else k
        key, n = k, 1
        while key in used:
            key, n = f"{k}_{n}", n + 1
        used.add(key)
        keys.append(key)
    return keys


def imagefolder_records(root: Path, classes: Optional[list[str]] = None) -> tuple[list[Record], list[str]]:
    """`root/CLASS/*.jpg` -> records; class indices follow sorted folder names, as torchvision does."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    own_classes = not classes  # a val/test folder of a pre-split tree may lack a rare class
    classes = classes or found
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected {root}/CLASS/IMAGE.jpg)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: folders {unknown} are not among the classes {classes}")
    if own_classes and len(classes) < 2:
        raise DataError(f"{root}: one class folder ({classes[0]}); a classifier needs at least two")
    found_files: list[tuple[Path, int]] = []
    skipped: Counter = Counter()
    for label, name in enumerate(classes):
        mine = 0
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                found_files.append((path, label))
                mine += 1
            else:
                skipped[path.suffix.lower() or "(no extension)"] += 1
        if not mine and own_classes:
            raise DataError(f"{root / name}: no images with extensions {IMAGE_EXTENSIONS}: the class would "
                            f"never be seen in training; remove the folder or add its images")
    if not found_files:
        raise DataError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    if skipped:
        print(f"dtl: {root}: skipped {sum(skipped.values())} files that are not images by their extension "
              f"({', '.join(f'{k}: {v}' for k, v in skipped.most_common())}); images: {IMAGE_EXTENSIONS}",
              file=sys.stderr)
    keys = unique_keys([p for p, _ in found_files], root)
    return [Record(k, p, label) for k, (p, label) in zip(keys, found_files)], classes


def write_imagefolder(root: str | Path, out_dir: str | Path, val_fraction: float = 0.1,
                      test_fraction: float = 0.2, seed: int = 0, maxcount: int = 128) -> dict:
    """Convert an ImageFolder tree, either pre-split (`root/train|val|test/CLASS/...`) or flat."""
    root = Path(root)
    pre_split = [s for s in ("train", "val", "valid", "validation", "test") if (root / s).is_dir()]
    if "train" in pre_split:
        records, classes = imagefolder_records(root / "train")
        splits = {"train": records}
        for name in pre_split[1:]:
            split_records, _ = imagefolder_records(root / name, classes)
            splits["test" if name == "test" else "val"] = split_records
    else:
        check_fractions(val_fraction, test_fraction)
        records, classes = imagefolder_records(root)
        splits = stratified_split(records, {"val": val_fraction, "test": test_fraction}, seed)
    return write_dataset(splits, classes, out_dir, maxcount, source=f"imagefolder:{root}")


ELPV_CLASSES = ["functional", "possibly_defective", "likely_defective", "defective"]


def elpv_records() -> list[Record]:
    """The ELPV solar cells from the `elpv-dataset` package; class = defect probability * 3."""
    try:
        import elpv_dataset
    except ImportError as e:
        raise DataError("prepare=elpv needs the quickstart extra: pip install -e '.[quickstart]'") from e
    data_dir = Path(elpv_dataset.__file__).parent / "data"
    records = []
    with open(data_dir / "labels.csv") as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            path, prob, cell_type = row[0], float(row[1]), row[2]
            records.append(Record(Path(path).stem, data_dir / path, int(round(prob * 3)),
                                  {"defect_probability": prob, "type": cell_type}))
    return records


def write_elpv(out_dir: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2,
               seed: int = 0, maxcount: int = 128) -> dict:
    check_fractions(val_fraction, test_fraction)
    splits = stratified_split(elpv_records(), {"val": val_fraction, "test": test_fraction}, seed)
    return write_dataset(splits, ELPV_CLASSES, out_dir, maxcount, source="elpv-dataset")


def _count_shard(url: str, classes: list[str], label_field: str) -> tuple[int, list[int]]:
    """Samples and per-class counts of one shard, read to its end-of-archive marker."""
    from dtl.shard_stream import iter_tar_samples, read_label

    n, key, counts = 0, None, [0] * len(classes)
    try:
        for sample in iter_tar_samples(url):
            key = sample["__key__"]
            try:
                counts[read_label(sample, label_field, len(classes), classes)] += 1
            except ValueError as e:
                raise DataError(f"shard {url}, sample {key}: {e}") from None
            n += 1
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"shard {url}: unreadable after {n} samples (last {key}): {type(e).__name__}: {e}") from None
    return n, counts


def index_shards(out_dir: str | Path, split_patterns: dict[str, str], classes: list[str],
                 label_field: str = "cls", threads: int = 16) -> dict:
    """Count the samples of shards written by another tool and write `dataset.json` for them.

    Every shard is read to its end-of-archive marker: one cut short, even exactly at a member
    boundary, is an error naming the shard, never a smaller count. Shards are read by `threads`
    threads at once (reading is I/O: local disks, HTTP, `pipe:` commands), with a progress bar.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from dtl.shard_stream import expand_shards

    out = Path(out_dir)
    if (out / INDEX_NAME).exists():  # never replace an index a run may be reading (or one `prepare` wrote)
        raise DataError(f"{out / INDEX_NAME} exists: remove it (or pick another folder) to index again")
    index = new_index(classes, "indexed")
    for split, pattern in split_patterns.items():
        urls = expand_shards(pattern, base=str(out))
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(tqdm(pool.map(lambda u: _count_shard(u, classes, label_field), urls), total=len(urls),
                                desc=f"indexing {split}", unit="shard", disable=len(urls) < 20))
        shards = [{"name": os.path.relpath(url, out) if is_local(url) else url, "count": n}
                  for url, (n, _) in zip(urls, results)]
        counts = [sum(c[i] for _, c in results) for i in range(len(classes))]
        add_split(index, split, shards, counts)
    seen = [sum(sp["class_counts"][i] for sp in index["splits"].values()) for i in range(len(classes))]
    if not all(seen):  # a wrong --classes list or --label-field, or a test set without a rare class
        import warnings

        from dtl.user_errors import DtlWarning
        warnings.warn(f"--classes: no sample of {[c for c, n in zip(classes, seen) if not n]} in any split "
                      f"(per class {seen}); check --classes and --label-field", DtlWarning, stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)  # remote or piped shards need no local folder of their own
    write_index(out, index)
    return index
