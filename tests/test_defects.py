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

import wandb_records
from conftest import CLASSES, encode, make_image, tiny_config
from dtl.checkpoints import CheckpointError
from dtl.run_config import Config
from dtl.train import train

REPO = Path(__file__).resolve().parent.parent

def _files(root: Path) -> dict:
    """Every file under root by content; a link by its target, not the content behind it.

    wandb links `logs/debug-core.log` to its service's own log outside the run, which the
    service appends to whenever any run in the process logs: not a write into this run. The
    service's other logs (`wandb/*/logs/`) are its own too, and it may still append to them after
    `wandb.finish()` has returned (seen under load): left out.
    """
    return {p: os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in root.rglob("*") if (p.is_symlink() or p.is_file())
            and not (p.parent.name == "logs" and p.parent.parent.parent.name == "wandb")}


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
    wandb_records.read_records(next(out.glob("wandb/offline-run-*/run-*.wandb")))  # W&B's service has finished it
    before = _files(out)
    with pytest.raises(FinishedRunError, match="is a finished run .*nothing was run or changed; its results are in"):
        train(Config.model_validate(cfg))
    # Other settings: the message names them, so a sweep cannot mistake the old result for the new one.
    # The loader workers are named too: the stream's slots are ranks x workers, so they change the order.
    changed = {**cfg, "optim": {**cfg.get("optim", {}), "lr": 0.5}, "data": {**cfg["data"], "num_workers": 2}}
    with pytest.raises(FinishedRunError, match=r"trained with other settings \(data.num_workers: 0 -> 2; optim.lr: .* -> 0.5\)"):
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
    from dtl.user_errors import DtlWarning
    assert warnings.formatwarning("skipped: x", DtlWarning, "/elsewhere/mod.py", 7) == "dtl: warning: skipped: x\n"
    other = warnings.formatwarning("x", UserWarning, where.__file__, 1)  # e.g. torch's, raised from a line of dtl's
    assert other.startswith(f"{where.__file__}:1: UserWarning: x")


@pytest.mark.parametrize("text, overrides, said", [
    (b"\xff\xfeoptim: {}\n", [], "not a UTF-8 text (YAML) file"),
    (b"optim:\n  lr: 0.5\nseed: 1\noptim:\n  weight_decay: 0.05\n", [], "duplicate key 'optim'"),
    (b"seed: 1\n", ["seed=-1"], "seed: Input should be greater than or equal to 0"),
    (b"seed: 1\n", ["optim.lr=.inf"], "optim.lr: Input should be a finite number"),
    (b"seed: 1\n", ["finetune.stages=[{epoch: 0, train: 1, lrmult: 2}]"],
     "finetune.stages.0.lrmult: unknown key (did you mean 'finetune.stages.0.lr_mult'?); valid keys here: epoch, "
     "train, lr_mult"),
    (b"seed: 1\n", ["data.progressive_resize.start=3"], "valid keys here: start_size, start_epoch, end_epoch"),
    (b"seed: 1\n", ["model.weights_map=3"], "model.weights_map: Input should be 'positional'"),
    (b"seed: 1\n", ["finetune.stages=[{epoch: 0"], "override 'finetune.stages=[{epoch: 0': not a valid value"),
    (b"seed: 1\n", ["model.head.hidden=[0]"], "model.head.hidden: every hidden layer needs at least 1 unit, got [0]"),
    (b"seed: 1\n", ["finetune.lr_range=[0.1,0.01]"], "lr_range=[low, high] needs 0 < low <= high"),
    (b"seed: 1\n", ["checkpoint.patience=1", "data.val_split=null"], "checkpoint.patience stops on a validation"),
    (b"seed: 1\n", ["finetune.probe.enabled=true", "model.head.hidden=[8]"], "finetune.probe trains a linear head"),
    (b"seed: 1\n", ["data.batch_size=true"], "data.batch_size: expected a number, got true"),
    (b"seed: 1\n", ["model.head.hidden=[8, false]"], "model.head.hidden: expected a number, got false"),
    (b"seed: 1\n", ["model.pretrained=1"], "model.pretrained: expected true or false or a name, got 1"),
    (b"seed: 1\n", ["wandb.enabled=0"], "wandb.enabled: expected true or false, got 0"),
    (b"seed: 1\n", ["data.samples={train: true}"], "data.samples: expected a number, got true"),
    (b"seed: 1\n", ["finetune.lr_range=true"], "finetune.lr_range: Input should be a valid tuple"),
])
def test_config_mistakes_are_one_line_naming_the_file_or_key(tmp_path, text, overrides, said):
    """Found by an independent check: a non-UTF-8 file and seed=-1 were tracebacks, a duplicate block
    silently lost its first copy, lr=.inf trained to NaN, hints were empty inside lists and optional
    sub-configs, a broken override was blamed on the config file, and pydantic's lax mode read
    `data.batch_size=true` as batches of one and `model.pretrained=1` as true."""
    from dtl.run_config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(text + b"data: {root: x}\nmodel: {backbone: test_efficientnet}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert said in msg and "\n" not in msg and "literal[" not in msg, msg
    if not overrides:
        assert str(path) in msg


def test_a_damaged_checkpoint_or_changed_head_is_refused_before_anything_is_written(tmp_path, shard_dir):
    """Found by an independent check: a cut model.safetensors or optimizer.bin and a changed model.head
    were tracebacks after config.yaml had been rewritten, and a cut RNG file resumed silently (no
    longer bitwise)."""
    cfg = tiny_config(tmp_path, shard_dir, epochs=2, stop_after_steps=2)
    train(Config.model_validate(cfg))
    out, (ck,) = tmp_path / "run", list((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    cfg["stop_after_steps"] = None
    for name, extra, said in (("model.safetensors", {}, "unreadable checkpoint file"),
                              ("optimizer.bin", {}, "unreadable checkpoint file (truncated or damaged"),
                              ("random_states_0.pkl", {}, "unreadable checkpoint file (truncated or damaged"),
                              (None, {"model": {**cfg["model"], "head": {"hidden": [8]}}},
                               "belongs to another model (a changed model.* setting, e.g. model.head?): missing in file ("),
                              (None, {"ema": {"enabled": True}}, "no ema.safetensors in this checkpoint")):
        if name:
            whole = (ck / name).read_bytes()
            (ck / name).write_bytes(whole[: len(whole) // 2])
        before = _files(out)
        with pytest.raises(CheckpointError, match=re.escape(str(ck / (name or "model.safetensors"))
                                                           if "ema" not in extra else str(ck))) as e:
            train(Config.model_validate({**cfg, **extra}))
        assert said in str(e.value) and _files(out) == before
        if name:
            (ck / name).write_bytes(whole)
    assert train(Config.model_validate(cfg)).summary["epochs_trained"] == 2  # the mended checkpoint resumes


def test_splits_sizes_and_heads_that_cannot_work_are_refused_before_writing(tmp_path, shard_dir):
    """Found by an independent check: data.val_split/test_split naming no split ran without them, in
    silence (and data.cache_dir was made before the split was refused); a model.head_module that is
    not the classifier and a ViT size off its patch grid failed mid-run (tracebacks)."""
    from dtl.dataset_index import DataError
    from dtl.run_config import ConfigError

    (tmp_path / "afile").write_text("")
    for extra, error, said in (({"data.val_split": "nope", "data.cache_dir": str(tmp_path / "cache")}, DataError,
                                "data.val_split='nope': "),
                               ({"data.test_split": "nope"}, DataError, "has no such split; it has ['test', 'train', 'val']"),
                               ({"data.cache_dir": str(tmp_path / "afile")}, DataError, "afile is a file, not a folder"),
                               ({"data.cache_dir": str(tmp_path / "afile" / "sub")}, DataError,
                                f"{tmp_path / 'afile'} is a file, not a folder"),
                               ({"model.head_module": "blocks"}, ConfigError, "model.head_module=blocks (or data.img_size)"),
                               ({"model.backbone": "test_vit", "data.img_size": 40}, ConfigError,
                                "data.img_size: test_vit fails on a blank 40x40 image"),
                               ({"data.label_field": "txt"}, DataError,
                                "missing label field 'txt' (data.label_field='txt'"),
                               ({"model.backbone": "torchvision/inception_v3", "model.aux_logits_weight": 0.4,
                                 "data.img_size": 224}, ConfigError,
                                "inception_v3's auxiliary classifier (model.aux_logits_weight) fails on a 224x224")):
        with pytest.raises(error, match=re.escape(said)):
            train(Config.model_validate(tiny_config(tmp_path, shard_dir, **extra)))
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    shutil.copytree(shard_dir, tmp_path / "noval")
    index = json.loads((tmp_path / "noval" / "dataset.json").read_text())
    del index["splits"]["val"]
    (tmp_path / "noval" / "dataset.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="data.val_split='val': .* has no such split, so the run goes without"):
        train(Config.model_validate(tiny_config(tmp_path, tmp_path / "noval", epochs=1)))
    with pytest.raises(DataError, match=r"checkpoint.patience stops on a validation metric, and .* has no split 'val'"):
        train(Config.model_validate(tiny_config(tmp_path / "p", tmp_path / "noval", **{"checkpoint.patience": 2})))
    assert not (tmp_path / "p" / "run").exists()


def test_damaged_weight_files_and_export_metadata_are_one_line(tmp_path, shard_dir, image_folder):
    """Found by an independent check: a cut .safetensors as model.pretrained, and an export whose dtl
    metadata lacks its classes or is not JSON, were tracebacks; a .pth holding a pickled module
    printed torch's seven-line advice."""
    from safetensors.torch import load_file, save_file

    from dtl.backbones import BackboneError
    from dtl.checkpoints import read_export_meta

    train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    weights = tmp_path / "run" / "model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:1000])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    for path in (cut, tmp_path / "module.pth"):
        with pytest.raises(BackboneError, match=re.escape(f"{path}: not a loadable weights file")) as e:
            train(Config.model_validate(tiny_config(tmp_path, shard_dir, **{"model.pretrained": str(path),
                                                                             "output_dir": str(tmp_path / "w")})))
        assert "\n" not in str(e.value)
    tensors = load_file(str(weights))
    meta = read_export_meta(weights)
    for name, dtl_meta, said in (("noclasses", json.dumps({k: v for k, v in meta.items() if k != "classes"}),
                                  "its dtl metadata lacks classes"),
                                 ("notjson", "{not json", "its dtl metadata is not valid JSON"),
                                 ("twoclasses", json.dumps({**meta, "classes": ["a", "b"]}),
                                  "weights do not fit its metadata (test_efficientnet, 2 classes): shape mismatch (2): classifier.bias: file (3,) vs model (2,)")):
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad), metadata={"dtl": dtl_meta})
        r = subprocess.run([sys.executable, "-m", "dtl.cli", "predict", str(bad), str(image_folder / "circle")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and said in r.stderr and str(bad) in r.stderr, r.stderr[-1500:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_yaml_merge_keys_work_and_user_keys_that_look_like_types_are_named(tmp_path):
    """From a review of the one-line config errors: the duplicate-key loader refused YAML merge keys,
    and dropping pydantic's union branches from a location dropped user keys named like types."""
    from dtl.run_config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("data: {root: x}\nmodel: {backbone: b}\n"
                    "finetune: {stages: [&s {epoch: 0, train: 1, lr_mult: 0.5}, {<<: *s, epoch: 2}]}\n")
    assert [(s.epoch, s.train, s.lr_mult) for s in load_config(path).finetune.stages] == [(0, 1, 0.5), (2, 1, 0.5)]
    path.write_text("data: {root: x, samples: {int: abc}}\nmodel: {backbone: b, float: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["model.pretrained=[1]"])
    assert "data.samples.int: Input should be a valid integer" in str(e.value)
    assert "model.float: unknown key" in str(e.value) and "model.pretrained: Input should be a valid boolean" in str(e.value)


def test_lr_find_and_launch_refuse_bad_arguments_in_one_line(tmp_path):
    """From the second review: lr-find took --start-lr 0 (ZeroDivisionError), a decreasing sweep, and
    an --out that is a file (FileExistsError)."""
    (tmp_path / "a_file").write_text("mine")
    quick = ["--config", str(REPO / "configs" / "quickstart.yaml")]
    for args, said in ((["--start-lr", "0"], "--start-lr: 0: must be a finite number above 0"),
                       (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr 1 must be below --end-lr 0.1"),
                       (["--out", str(tmp_path / "a_file")], "is a file; give a folder")):
        r = subprocess.run([sys.executable, "-m", "dtl.cli", "lr-find", *quick, *args], capture_output=True, text=True)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert (tmp_path / "a_file").read_text() == "mine"
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "launch", "--dry-run", "--", "--help"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-1500:]  # train.py's own help is not a bad argument


def test_wandb_that_cannot_start_is_one_line(tmp_path, shard_dir):
    """From a new-user check: WANDB_MODE=online without a login, and an unknown WANDB_MODE, ended in
    wandb's and pydantic's tracebacks (exit 1)."""
    import os

    from conftest import tiny_config, write_config

    cfg = write_config(tmp_path / "c.yaml", {**tiny_config(tmp_path, shard_dir, epochs=1), "wandb": {"enabled": True}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    for mode, said in (("bogus", "WANDB_MODE='bogus': W&B knows online, offline, disabled"),
                       ("online", "W&B did not start (mode online): No API key configured")):
        r = subprocess.run([sys.executable, "-m", "dtl.train", "--config", str(cfg)], capture_output=True, text=True,
                           env={**env, "WANDB_MODE": mode, "HOME": str(tmp_path / "home")}, timeout=300)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (mode, r.stderr[-2000:])
