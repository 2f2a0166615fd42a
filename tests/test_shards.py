import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from conftest import CLASSES, encode, image_size, make_image
from dtl.shard_stream import (DataError, ShardStream, StreamOptions, batches_per_epoch, make_loader,
                              read_index, split_source)
from dtl.shard_writer import write_imagefolder


def _ids(stream: ShardStream, epoch: int = 0, workers: int = 0, batch_size: int = 4) -> list[str]:
    stream.set_epoch(epoch)
    return [k for b in make_loader(stream, batch_size, workers) for k in b["key"]]


def _stream(root, split="train", train=False, rank=0, world=1, workers=0, **kw) -> ShardStream:
    index = read_index(str(root))
    source = split_source(str(root), split, index, kw.pop("shards", {}), kw.pop("samples", {}))
    opts = StreamOptions(classes=kw.pop("classes", CLASSES), train=train, shuffle_buffer=8, **kw)
    return ShardStream(source, image_size, opts, rank, world, workers)


def test_imagefolder_roundtrip_is_stratified_and_exact(shard_dir, image_folder):
    index = json.loads((shard_dir / "dataset.json").read_text())
    assert index["classes"] == CLASSES
    total = sum(s["count"] for s in index["splits"].values())
    assert total == 72
    for split in index["splits"].values():  # every split holds every class in proportion
        assert all(c > 0 for c in split["class_counts"])
        assert sum(sh["count"] for sh in split["shards"]) == split["count"]
    # eval streams return every sample exactly once with its label
    keys = set()
    for split in index["splits"]:
        stream = _stream(shard_dir, split)
        for batch in make_loader(stream, 5, 0):
            for key, label in zip(batch["key"], batch["label"].tolist()):
                assert key.startswith(CLASSES[label])
                keys.add(key)
    assert len(keys) == 72


def test_split_is_seeded(tmp_path, image_folder):
    a = write_imagefolder(image_folder, tmp_path / "a", seed=1, maxcount=8)
    b = write_imagefolder(image_folder, tmp_path / "b", seed=1, maxcount=8)
    write_imagefolder(image_folder, tmp_path / "c", seed=2, maxcount=8)
    keys = lambda root: sorted(_ids(_stream(root, "test")))
    assert keys(tmp_path / "a") == keys(tmp_path / "b") != keys(tmp_path / "c")
    assert a == b


def test_pre_split_imagefolder(tmp_path):
    from conftest import write_imagefolder as make_folder

    make_folder(tmp_path / "src" / "train", per_class=5)
    make_folder(tmp_path / "src" / "val", per_class=2)
    index = write_imagefolder(tmp_path / "src", tmp_path / "out", maxcount=4)
    assert index["splits"]["train"]["count"] == 15 and index["splits"]["val"]["count"] == 6
    assert "test" not in index["splits"]


def test_reads_shards_from_webdataset_shardwriter_and_plain_tar(tmp_path):
    # webdataset's own writer, with a class name in json instead of cls
    pattern = str(tmp_path / "wds-%03d.tar")
    with wds.ShardWriter(pattern, maxcount=5) as sink:
        for i in range(12):
            sink.write({"__key__": f"s{i:03d}", "png": encode(make_image(i % 3, i), "PNG"),
                        "cls": i % 3, "json": {"label": CLASSES[i % 3]}})
    # plain tar with keys holding dots and sub-folders, CMYK/L/P images
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        for i, mode in enumerate(["CMYK", "L", "P", "RGBA", "RGB", "L"]):
            img = make_image(i % 3, 100 + i, mode=mode)
            for ext, data in (("jpg" if mode in ("CMYK", "L", "RGB") else "png",
                               encode(img, "JPEG" if mode in ("CMYK", "L", "RGB") else "PNG")),
                              ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"dir/sub/img.v{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for spec, label_field, n in ((str(tmp_path / "wds-{000..002}.tar"), "cls", 12),
                                 (str(tmp_path / "wds-*.tar"), "json.label", 12),
                                 (str(plain), "cls", 6)):
        stream = _stream(tmp_path, "x", shards={"x": spec}, samples={"x": n}, label_field=label_field)
        got = [(k, l) for b in make_loader(stream, 4, 0) for k, l in zip(b["key"], b["label"].tolist())]
        assert len(got) == n and len({k for k, _ in got}) == n
        if spec.endswith("plain.tar"):
            assert {k for k, _ in got} == {f"dir/sub/img.v{i}" for i in range(6)}
            assert dict(got) == {f"dir/sub/img.v{i}": i % 3 for i in range(6)}
        else:
            assert all(int(k[1:]) % 3 == l for k, l in got)


def test_train_epoch_is_exact_and_reshuffled(shard_dir):
    stream = _stream(shard_dir, train=True, seed=3)
    e0, e0b, e1 = (_ids(stream, e, batch_size=1) for e in (0, 0, 1))
    assert e0 == e0b                                   # order is a function of (seed, epoch)
    assert e0 != e1 and sorted(e0) == sorted(e1)       # new order, same samples
    assert len(e0) == len(set(e0)) == stream.source.total


def test_ranks_and_workers_split_exactly(shard_dir):
    total = _stream(shard_dir, train=True).source.total
    seen: Counter = Counter()
    steps = []
    for rank in range(2):
        s = _stream(shard_dir, train=True, rank=rank, world=2, workers=2, seed=5)
        ids = _ids(s, epoch=2, workers=2, batch_size=3)
        steps.append(len(ids) // 3)
        assert len(ids) // 3 == batches_per_epoch(s, 3)
        seen.update(ids)
    assert steps[0] == steps[1]
    assert max(seen.values()) == 1                     # never twice
    assert total - sum(seen.values()) < 2 * 2 * 3      # drop is less than ranks x workers x batch


class _CountingTransform:
    def __init__(self):
        self.calls = 0

    def __call__(self, img):
        self.calls += 1
        return image_size(img)


def test_a_training_slot_decodes_only_the_whole_batches_its_loader_delivers(shard_dir):
    """The loader's drop_last throws a slot's last partial batch away; decoding it would be wasted
    work (16 % of it at 12 workers x 128 on ELPV), so the slot never decodes those samples."""
    s = _stream(shard_dir, train=True, seed=4)
    per = s.samples_per_slot()
    assert per % 7, "the split must not divide into batches of 7 for this test"
    counting = s.transform = _CountingTransform()
    s.set_epoch(1, batch_size=7)
    keys = [k for b in make_loader(s, 7, 0) for k in b["key"]]
    assert len(keys) == counting.calls == per - per % 7 == 7 * batches_per_epoch(s, 7)
    full = _stream(shard_dir, train=True, seed=4)
    full.set_epoch(1)  # without the batch size: every sample of the slot, in the same order
    assert [k for _, _, k in full][:len(keys)] == keys


def test_resume_mid_epoch_sees_the_same_remaining_ids(shard_dir):
    full = _ids(_stream(shard_dir, train=True, workers=2, seed=7), epoch=1, workers=2, batch_size=3)
    s = _stream(shard_dir, train=True, workers=2, seed=7)
    s.set_epoch(1, skip_batches=5, batch_size=3)
    rest = [k for b in make_loader(s, 3, 2) for k in b["key"]]
    assert rest == full[15:]


def _corrupt_copy(shard_dir: Path, tmp_path: Path, mutate) -> Path:
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(shard_dir, out)
    mutate(out)
    return out


def _rewrite_member(path: Path, match: str, data: bytes | None) -> str:
    """Replace (or drop, when data is None) the first member whose name ends with `match`."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    hit = next(m.name for m, _ in members if m.name.endswith(match))
    with tarfile.open(path, "w") as tar:
        for m, payload in members:
            if m.name == hit:
                if data is None:
                    continue
                payload = data
                m.size = len(data)
            tar.addfile(m, io.BytesIO(payload))
    return hit.rsplit(".", 1)[0]


@pytest.mark.parametrize("kind", ["image", "label", "range", "truncated"])
def test_corrupt_data_error_names_shard_and_key_and_skip_counts(shard_dir, tmp_path, kind):
    shard = "train-000001.tar"
    key = {}

    def mutate(root):
        p = root / shard
        if kind == "image":
            key["k"] = _rewrite_member(p, ".jpg", b"not an image")
        elif kind == "label":
            key["k"] = _rewrite_member(p, ".cls", None)
        elif kind == "range":
            key["k"] = _rewrite_member(p, ".cls", b"7")
        else:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])

    root = _corrupt_copy(shard_dir, tmp_path, mutate)
    with pytest.raises(DataError) as e:
        _ids(_stream(root, train=True))
    assert shard in str(e.value)
    if key:
        assert key["k"] in str(e.value)
    log = tmp_path / "bad.jsonl"
    stream = _stream(root, train=True, on_error="skip", max_errors=8, error_log=str(log))  # a cut shard loses 4
    with pytest.warns(UserWarning, match="skipped"):
        ids = _ids(stream, batch_size=1)
    assert len(ids) == stream.source.total             # skipped samples are replaced, the step count holds
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries and all(shard in e["shard"] for e in entries)
    with pytest.raises(DataError, match="max_errors=0"):
        _ids(_stream(root, train=True, on_error="skip", max_errors=0))


def test_missing_split_and_index(tmp_path, shard_dir):
    with pytest.raises(DataError, match="no split 'nope'"):
        _stream(shard_dir, "nope")
    with pytest.raises(DataError, match="dataset.json not found"):
        _stream(tmp_path, "train")
    with pytest.raises(DataError, match="data.samples.train"):
        _stream(tmp_path, "train", shards={"train": str(shard_dir / "train-*.tar")})


def test_a_missing_shard_file_is_named_as_missing(tmp_path, shard_dir):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shard_dir, root)
    gone = sorted(root.glob("val-*.tar"))[0]
    gone.unlink()
    with pytest.raises(DataError, match=rf"shard {gone}: file not found \(moved or deleted\?\)"):
        _ids(_stream(root, "val"))


def test_an_overstated_sample_count_is_named(shard_dir):
    """Shards without counts, fewer than the slots: the slot runs out before its share of the declared count."""
    one = sorted(shard_dir.glob("train-*.tar"))[0]
    stream = _stream(shard_dir, train=True, world=2, shards={"train": str(one)}, samples={"train": 100})
    with pytest.raises(DataError, match=r"fewer good samples than the 100 declared \(data.samples.train\)"):
        _ids(stream)


def test_index_command_for_foreign_shards(tmp_path):
    with wds.ShardWriter(str(tmp_path / "f-%02d.tar"), maxcount=4) as sink:
        for i in range(10):
            sink.write({"__key__": f"k{i}", "jpg": encode(make_image(i % 3, i)), "txt": CLASSES[i % 3]})
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "index", str(tmp_path),
                        "--split", "train=f-{00..02}.tar", "--classes", ",".join(CLASSES), "--label-field", "txt"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "dataset.json").read_text())
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [4, 4, 2]
    assert index["splits"]["train"]["class_counts"] == [4, 3, 3]
    assert len(_ids(_stream(tmp_path, label_field="txt"))) == 10
    with pytest.raises(DataError, match=r"sample k0: .*missing label field 'cls' \(data.label_field='cls'; "
                                        r"the sample's fields: \['jpg', 'txt'\]\)"):
        _ids(_stream(tmp_path))  # the default field, on shards that carry the label as txt
    # pipe: commands are stored as written (not as paths relative to the folder) and read back
    piped = tmp_path / "piped"
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "index", str(piped), "--split",
                        f"train=pipe:cat {tmp_path}/f-{{00..02}}.tar", "--classes", ",".join(CLASSES),
                        "--label-field", "txt"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = [s["name"] for s in json.loads((piped / "dataset.json").read_text())["splits"]["train"]["shards"]]
    assert names == [f"pipe:cat {tmp_path}/f-{i:02d}.tar" for i in range(3)]
    assert len(_ids(_stream(piped, label_field="txt"))) == 10
    bad = subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "index", str(piped), "--split", "f-00.tar",
                          "--classes", ",".join(CLASSES)], capture_output=True, text=True)
    assert bad.returncode == 2 and "'f-00.tar': expected NAME=PATTERN" in bad.stderr, bad.stderr
    extra = subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "index", str(tmp_path / "x"), "--split",
                            f"train={tmp_path}/f-00.tar", "--classes", ",".join([*CLASSES, "hexagon"]),
                            "--label-field", "txt"], capture_output=True, text=True)
    assert extra.returncode == 0 and "warning: --classes: no sample of ['hexagon'] in any split" in extra.stderr, \
        extra.stderr  # said, not refused: a test set may lack a rare class the model knows
    before = (tmp_path / "dataset.json").read_bytes()
    again = subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "index", str(tmp_path), "--split",
                            "train=f-00.tar", "--classes", ",".join(CLASSES)], capture_output=True, text=True)
    assert again.returncode == 2 and "dataset.json exists: remove it" in again.stderr, again.stderr
    assert (tmp_path / "dataset.json").read_bytes() == before


def test_shards_cli_help():
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "imagefolder", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "ImageFolder" in r.stdout and "--maxcount" in r.stdout


def test_shard_writer_checks_images_fractions_and_its_folder_before_writing(tmp_path):
    """Bad files are named when the shards are written, not hours into training; nothing is overwritten."""
    from conftest import write_imagefolder as make_folder

    def shards(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dtl.cli", "shards", "imagefolder", *args],
                              capture_output=True, text=True)

    src = make_folder(tmp_path / "src", per_class=4)
    (src / "circle" / "fake.jpg").write_bytes(b"x")
    cut = encode(make_image(0, 1), "PNG")
    (src / "square" / "cut.png").write_bytes(cut[: len(cut) // 2])
    (src / "stripes" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    r = shards(str(src), str(out), "--val", "0.25")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "fake.jpg: not a readable image" in r.stderr and "1 more bad images" in r.stderr and "cut.png" in r.stderr
    assert "BytesIO" not in r.stderr and not out.exists()
    (src / "circle" / "fake.jpg").unlink()
    (src / "square" / "cut.png").unlink()
    r = shards(str(src), str(out))  # 4 images a class: --val 0.1 rounds to none in each
    assert r.returncode == 2 and "the val fraction 0.1 rounds to no image in any class" in r.stderr, r.stderr
    assert not out.exists()
    r = shards(str(src), str(out), "--val", "0.25")
    assert r.returncode == 0 and "skipped 1 files that are not images by their extension (.txt: 1)" in r.stderr
    written = (out / "dataset.json").read_bytes()
    r = shards(str(src), str(out), "--val", "0.3")  # over a dataset that runs may read
    assert r.returncode == 2 and "holds a dataset" in r.stderr and (out / "dataset.json").read_bytes() == written
    r = shards(str(src), str(tmp_path / "o2"), "--val", "0.6", "--test", "0.6")
    assert r.returncode == 2 and "leave no images for training" in r.stderr
    (src / "empty").mkdir()
    r = shards(str(src), str(tmp_path / "o3"), "--val", "0.25")
    assert r.returncode == 2 and "empty: no images" in r.stderr
    one = make_folder(tmp_path / "one", per_class=2)
    for name in CLASSES[1:]:
        for f in (one / name).iterdir():
            f.unlink()
        (one / name).rmdir()
    r = shards(str(one), str(tmp_path / "o4"))
    assert r.returncode == 2 and "needs at least two" in r.stderr
    assert not any((tmp_path / d).exists() for d in ("o2", "o3", "o4"))


@pytest.mark.parametrize("mutate, message", [
    (lambda ix: ix["splits"]["train"]["shards"][0].update(count="8"), r"count '8' is not a whole number"),
    (lambda ix: ix["splits"]["train"]["shards"][0].update(count=-1), r"count -1 is not a whole number"),
    (lambda ix: ix["splits"]["train"]["shards"][0].update(name=7), r"shard name 7 is not a file name"),
    (lambda ix: ix["splits"]["train"].update(class_counts="many"), r"'class_counts' must be a list"),
    (lambda ix: ix["splits"]["train"].update(class_counts=[1, 2]), r"2 class counts for 3 classes"),
    (lambda ix: ix.update(classes=["a", "a", "b"]), r"'classes' has duplicates"),
])
def test_a_malformed_dataset_json_is_named_in_one_line(tmp_path, shard_dir, mutate, message):
    """Each broken field of dataset.json is a DataError naming the file and field, not a TypeError later."""
    index = json.loads((shard_dir / "dataset.json").read_text())
    mutate(index)
    (tmp_path / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=message) as e:
        read_index(str(tmp_path))
    assert "dataset.json" in str(e.value)


def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped():
    """A 16-bit PNG (X-rays, microscopy) decodes as its 8-bit twin; PIL's own convert clips at 255."""
    import numpy as np
    from PIL import Image

    from dtl.shard_stream import load_rgb

    grey8 = np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint8)
    grey16 = grey8.astype(np.uint16) * 257          # the same picture at 16 bits
    files = {}
    for name, a in (("8", grey8), ("16", grey16)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        files[name] = buf.getvalue()
    assert Image.open(io.BytesIO(files["16"])).mode.startswith("I")
    a8, a16 = (np.asarray(load_rgb(Image.open(io.BytesIO(files[n])))) for n in ("8", "16"))
    assert a16.shape == (24, 24, 3) and np.array_equal(a8, a16)
    clipped = np.asarray(Image.open(io.BytesIO(files["16"])).convert("L"))
    assert (clipped == 255).mean() > 0.9             # what a plain convert gives: nearly all white
    dark = Image.fromarray(np.full((4, 4), 200, dtype=np.int32), "I")  # 'I': a 16-bit PGM, an older PIL's PNG
    assert np.asarray(load_rgb(dark)).max() == 1                      # by mode, not content: dark stays dark
