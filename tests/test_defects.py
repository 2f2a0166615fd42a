"""Defects found by trying dtl as a new user would and by independent checks (each failed before its fix)."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds

from conftest import CLASSES, encode, make_image, tiny_config
from dtl.checkpoints import CheckpointError
from dtl.run_config import Config
from dtl.train import train

REPO = Path(__file__).resolve().parent.parent

def _files(root: Path) -> dict:
    """Every file under root by content; a link by its target, not the content behind it.

    wandb links `logs/debug-core.log` to its service's own log outside the run, which the
    service appends to whenever any run in the process logs: not a write into this run.
    """
    return {p: os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in root.rglob("*") if p.is_symlink() or p.is_file()}


def test_a_rejected_resume_writes_nothing(tmp_path, shard_dir):
    train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    out = tmp_path / "run"
    before = _files(out)
    cfg = tiny_config(tmp_path, shard_dir, epochs=2, **{"model.backbone": "test_resnet"})
    with pytest.raises(CheckpointError, match="backbone"):
        train(Config.model_validate(cfg))
    assert _files(out) == before  # config.yaml is still the run's own


def test_rerunning_a_finished_run_is_refused_and_changes_nothing(tmp_path, shard_dir, monkeypatch):
    from dtl.run_finish import FinishedRunError

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(tmp_path, shard_dir, epochs=1, **{"wandb.enabled": True, "wandb.project": "dtl-test"})
    train(Config.model_validate(cfg))
    out = tmp_path / "run"
    before = _files(out)
    with pytest.raises(FinishedRunError, match="is a finished run .*nothing was run or changed; its results are in"):
        train(Config.model_validate(cfg))
    # Other settings: the message names them, so a sweep cannot mistake the old result for the new one.
    changed = {**cfg, "optim": {**cfg.get("optim", {}), "lr": 0.5}, "data": {**cfg["data"], "num_workers": 1}}
    with pytest.raises(FinishedRunError, match=r"trained with other settings \(optim.lr: .* -> 0.5\)"):
        train(Config.model_validate(changed))
    assert _files(out) == before  # no summary rewrite, no metrics row, no new W&B run


def test_prepare_writes_only_into_a_missing_or_empty_folder(tmp_path, shard_dir, image_folder):
    from dtl.data_pipeline import prepare_shards
    from dtl.dataset_index import DataError

    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    cfg = Config.model_validate(tiny_config(tmp_path, shard_dir, **{
        "data.root": str(mine), "data.prepare": "imagefolder", "data.source": str(image_folder)}))
    with pytest.raises(DataError, match="not empty and holds no dataset.json"):
        prepare_shards(cfg.data, 0)
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    for target in (tmp_path / "fresh", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        cfg.data.root = str(target)
        prepare_shards(cfg.data, 0)
        assert (target / "dataset.json").is_file()
        assert not list(tmp_path.glob(".*.partial"))


def test_colliding_sample_keys_are_made_unique(tmp_path):
    from dtl.shard_writer import write_imagefolder

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for i, name in enumerate(["img0.png", "img0.jpg", "my img.png", "my_img.png", "x.y.png", "x_y.png"]):
        make_image(i % 3, i).save(src / name)
    (tmp_path / "src" / "b").mkdir()
    make_image(1, 99).save(tmp_path / "src" / "b" / "z.png")
    index = write_imagefolder(tmp_path / "src", tmp_path / "out", val_fraction=0, test_fraction=0, maxcount=100)
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False)]
    assert index["splits"]["train"]["count"] == 7 and len(set(keys)) == 7, keys


def _foreign_shard(path: Path, n: int) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"k{i}", "jpg": encode(make_image(i % 3, i)), "cls": i % 3})


def test_index_refuses_a_shard_cut_at_a_member_boundary_or_mid_member_naming_it(tmp_path):
    import tarfile

    from dtl.dataset_index import DataError
    from dtl.shard_writer import index_shards

    _foreign_shard(tmp_path / "good.tar", 4)
    raw = (tmp_path / "good.tar").read_bytes()
    with tarfile.open(tmp_path / "good.tar") as tf:
        members = tf.getmembers()
    boundary = members[4].offset  # the first member of the third sample: a clean cut between members
    (tmp_path / "cut.tar").write_bytes(raw[:boundary])
    (tmp_path / "mid.tar").write_bytes(raw[:boundary + 700])
    for name in ("cut.tar", "mid.tar"):
        with pytest.raises(DataError, match=re.escape(name)):
            index_shards(tmp_path, {"train": name}, CLASSES)
    assert index_shards(tmp_path, {"train": "good.tar"}, CLASSES)["splits"]["train"]["count"] == 4


def test_skip_counts_and_logs_every_sample_a_truncated_shard_lost(shard_dir, tmp_path):
    from dtl.shard_stream import ShardStream, StreamOptions, make_loader, read_index, split_source

    root = tmp_path / "trunc"
    shutil.copytree(shard_dir, root)
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    log = tmp_path / "bad.jsonl"
    source = split_source(str(root), "train", read_index(str(root)), {}, {})
    stream = ShardStream(source, lambda img: torch.zeros(1), StreamOptions(
        classes=CLASSES, train=True, shuffle_buffer=8, on_error="skip", max_errors=100, error_log=str(log)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [k for b in make_loader(stream, 1, 0) for k in b["key"]]
    filled = [int(m.group(1)) for w in caught if (m := re.search(r"filled (\d+) skipped", str(w.message)))]
    lines = log.read_text().splitlines()
    assert len(ids) == source.total and filled and len(lines) == sum(filled) > 1
    with pytest.raises(Exception, match="max_errors=2"):
        stream.opt.max_errors = 2
        [b for b in make_loader(stream, 1, 0)]


def test_warns_when_whole_batches_leave_out_much_of_the_split(tmp_path):
    from dtl.data_pipeline import warn_dropped_samples
    from dtl.shard_stream import ShardStream, SplitSource, StreamOptions

    src = SplitSource("train", ["one.tar"], [42], 42)
    stream = ShardStream(src, lambda i: i, StreamOptions(classes=CLASSES, train=True), num_workers=2)
    with pytest.warns(UserWarning, match=r"10 of 42 training samples .* data.num_workers=1 drops 2"):
        warn_dropped_samples(stream, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_dropped_samples(ShardStream(SplitSource("train", ["a.tar"], [400], 400), lambda i: i,
                                         StreamOptions(classes=CLASSES, train=True), num_workers=2), 8, 1)


def test_epoch_records_show_the_rates_of_that_epoch(tmp_path, shard_dir):
    train(Config.model_validate(tiny_config(tmp_path, shard_dir, **{"finetune.join_warmup_epochs": 0.0})))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train/acc" in r]
    frozen_in_0 = [k for k in epochs[0] if k.startswith("lr/") and not k.endswith("_head")]
    assert frozen_in_0 and all(epochs[0][k] == 0 for k in frozen_in_0)       # frozen during epoch 0
    assert all(epochs[2][k] > 0 for k in epochs[2] if k.startswith("lr/"))   # all train in epoch 2


def test_exports_are_readable_by_the_group(tmp_path, shard_dir):
    old = os.umask(0o022)
    try:
        train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    finally:
        os.umask(old)
    for name in ("model.safetensors", "best.safetensors"):
        mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        assert mode == 0o644, oct(mode)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtl.cli", *args], capture_output=True, text=True)


def test_help_describes_every_argument_and_config_keys_are_listed():
    predict = " ".join(_cli("predict", "--help").stdout.split())  # argparse wraps lines
    assert "model.safetensors, best.safetensors or probe.safetensors" in predict and "image files" in predict
    assert "(default: 1)" in predict
    assert "classes of the head" in _cli("groups", "--help").stdout
    assert "Read shards written by another tool" in _cli("shards", "index", "--help").stdout
    assert "(flat folders)" not in _cli("shards", "elpv", "--help").stdout
    ref = _cli("config").stdout
    from dtl.config_reference import config_keys

    for key, _, _, desc in config_keys():
        assert desc and re.search(rf"^{re.escape(key)}\s", ref, re.M), key
    template = _cli("config", "--template").stdout
    assert "prepare: none" in template and "offline" not in template.split("wandb:")[0]
    assert "Exit codes" in _cli("--help").stdout
    assert template == (REPO / "dtl" / "config_templates" / "own_data.yaml").read_text()
    assert (REPO / "configs" / "own_data.yaml").resolve() == (REPO / "dtl" / "config_templates" / "own_data.yaml")


def test_a_built_wheel_carries_the_config_template(tmp_path):
    """`dtl config --template` is for users without the repository: the wheel holds the template."""
    import importlib.util
    import zipfile

    import setuptools

    if importlib.util.find_spec("wheel") is None and tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1):
        pytest.skip("building a wheel without isolation needs setuptools >= 70.1 or the wheel package")
    src = tmp_path / "src"  # a copy of what the build reads, so the checkout gets no build/ or egg-info
    shutil.copytree(REPO / "dtl", src / "dtl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("dtl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("dtl/config_templates/own_data.yaml").decode() == \
            (REPO / "dtl" / "config_templates" / "own_data.yaml").read_text()


def test_group_names_say_what_they_hold_and_a_heads_norm_trains_with_it():
    from dtl.backbones import create_classifier
    from dtl.layer_groups import layer_groups

    names = [g.name for g in layer_groups(create_classifier("tf_efficientnet_lite0", 4))]
    assert "blocks.6.0+conv_head+bn2" in names
    convnext = layer_groups(create_classifier("convnext_tiny", 4))
    assert {"head.norm.weight", "head.fc.weight"} <= set(convnext[-1].params)
    r = _cli("groups", "test_efficientnet", "--regex", "^conv_stem|^bn1|^blocks", "--regex", "^conv_head|^bn2")
    assert r.returncode == 0 and "(by your regexes)" in r.stdout and "coarse" not in r.stdout


def test_predict_classifies_the_good_images_when_one_is_unreadable(tmp_path, shard_dir, image_folder):
    train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = sorted((image_folder / "circle").glob("*.jpg"))[:3]
    r = _cli("predict", str(tmp_path / "run" / "model.safetensors"), str(good[0]), str(bad), *map(str, good[1:]))
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 2 and [row["image"] for row in rows] == [str(good[0]), str(bad), *map(str, good[1:])]
    assert "error" in rows[1] and all("predictions" in row for i, row in enumerate(rows) if i != 1)


def test_an_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, shard_dir):
    from dtl.run_config import ConfigError

    (tmp_path / "run").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    assert (tmp_path / "run").read_text() == "mine"


def test_an_evaluation_reads_its_split_once_and_dtl_warnings_are_one_line(tmp_path, shard_dir):
    """tqdm.auto's bar iterates what it wraps twice: every evaluation started its loader's workers
    twice, and a bad test sample was decoded and logged twice per evaluation."""
    import dtl.user_errors  # noqa: F401 (installs the warning format)
    from test_shards import _corrupt_copy, _rewrite_member

    key = {}
    root = _corrupt_copy(shard_dir, tmp_path, lambda r: key.setdefault(
        "k", _rewrite_member(r / "test-000000.tar", ".jpg", b"not an image")))
    cfg = tiny_config(tmp_path, root, epochs=1, **{"data.num_workers": 2, "data.on_error": "skip"})
    summary = train(Config.model_validate(cfg)).summary
    evaluations = 1 + ("test_final/acc" in summary)  # the selected weights, and the final ones when they differ
    log = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.rank0.jsonl").read_text().splitlines()]
    assert [(r["split"], r["key"]) for r in log] == [("test", key["k"])] * evaluations
    assert summary["test/samples"] == 14  # 15 test images, one unreadable

    import dtl.shard_stream as where
    assert warnings.formatwarning("skipped: x", UserWarning, where.__file__, 1) == "dtl: warning: skipped: x\n"
    python = warnings.formatwarning("x", UserWarning, "/elsewhere/mod.py", 7)
    assert python.startswith("/elsewhere/mod.py:7: UserWarning: x")
