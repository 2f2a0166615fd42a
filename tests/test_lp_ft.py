"""LP-FT: the probe on cached features, model selection by a monitored metric, early stopping, TTA."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dtl.checkpoints import read_export_meta
from dtl.run_config import Config
from dtl.run_finish import FinishedRunError
from dtl.train import train


def _probe_config(tmp_path, shard_dir, **extra) -> Config:
    return Config.model_validate(tiny_config(tmp_path, shard_dir, **{
        "finetune.probe": {"enabled": True, "epochs": 60, "patience": 20, "lr": 0.05, "augmented_views": 1},
        "finetune.stages": [{"epoch": 0, "train": 3}, {"epoch": 1, "train": "all"}], **extra}))


def test_probe_trains_the_head_first_and_is_a_best_model_candidate(tmp_path, shard_dir, capsys):
    result = train(_probe_config(tmp_path, shard_dir))
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in records if "probe/epochs" in r]
    assert len(probe) == 1 and probe[0]["probe/train_rows"] == 2 * 45  # clean + 1 augmented view
    assert probe[0]["val/acc"] > 0.5                                    # chance is 1/3
    epochs = [r["val/acc"] for r in records if "train/acc" in r]
    assert probe[0]["epoch"] == 0 and [r["epoch"] for r in records if "train/acc" in r] == [1, 2, 3]  # as the console
    # never worse on validation than its own probe: best.safetensors is the better of all
    assert result.summary["val/best_acc"] == pytest.approx(max([probe[0]["val/acc"], *epochs]))
    assert "probe (LP-FT)" in capsys.readouterr().out
    assert (out / "best.safetensors").is_file()
    if result.summary["best_epoch"] == 0:  # the probe won: its weights are the pretrained ones + the head
        assert "test_final/acc" in result.summary


def test_probe_head_is_the_same_when_resumed(tmp_path, shard_dir):
    cfg = _probe_config(tmp_path / "a", shard_dir)
    full = train(cfg)
    cfg2 = _probe_config(tmp_path / "b", shard_dir, stop_after_steps=3)
    assert train(cfg2).stopped
    probe_file = tmp_path / "b" / "run" / "probe.safetensors"
    written = probe_file.stat().st_mtime_ns
    cfg2.stop_after_steps = None
    resumed = train(cfg2)
    assert resumed.summary["steps"] == full.summary["steps"]
    a = load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the probe's model: written once by the interrupted process, kept by the resumed one, equal to the uninterrupted run's
    assert probe_file.stat().st_mtime_ns == written
    pa, pb = (load_file(str(tmp_path / r / "run" / "probe.safetensors")) for r in ("a", "b"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert read_export_meta(str(probe_file))["backbone"] == cfg2.model.backbone


def test_monitor_min_loss_picks_the_lowest_validation_loss(tmp_path, shard_dir):
    s = train(Config.model_validate(tiny_config(tmp_path, shard_dir, **{"checkpoint.monitor": "val/loss"}))).summary
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in records if "train/acc" in r]
    assert s["monitor"] == "val/loss" and s["val/best_loss"] == pytest.approx(min(losses))
    assert s["best_epoch"] == 1 + losses.index(min(losses))
    best = next(r for r in records if r["epoch"] == s["best_epoch"] and "train/acc" in r)  # the record it names
    assert best["val/loss"] == s["val/best_loss"]


def test_early_stopping_ends_a_run_that_stopped_improving(tmp_path, shard_dir):
    cfg = Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=8, **{
        "checkpoint.patience": 1, "optim.lr": 1e-12, "finetune.stages": [{"epoch": 0, "train": 1}]}))
    s = train(cfg).summary  # an lr of 1e-12 leaves validation accuracy where it was
    assert s["epochs_trained"] == 2 and s["best_epoch"] == 1
    with pytest.raises(FinishedRunError, match="stopped early") as e:  # an early-stopped run is finished
        train(cfg)
    assert "Raise epochs=" not in str(e.value) and "Set another output_dir" in str(e.value)  # more epochs would not train


def test_tta_flips_on_the_test_and_validation_only_when_asked(tmp_path, shard_dir):
    import json

    from dtl.cli import main

    plain = train(Config.model_validate(tiny_config(tmp_path / "a", shard_dir, epochs=2))).summary
    s = train(Config.model_validate(tiny_config(tmp_path / "b", shard_dir, epochs=2, **{"eval.tta": "flips"}))).summary
    assert s["val/best_acc"] == plain["val/best_acc"] and s["best_epoch"] == plain["best_epoch"]  # val: no TTA
    best = str(tmp_path / "b" / "run" / "best.safetensors")  # in-process: the CLI's own tests start it as a user does
    assert main(["eval", best, "--data", str(shard_dir), "--tta", "flips", "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["acc"] == s["test/acc"] and ev["samples"] == 15  # the run's test is the TTA test
    assert main(["eval", best, "--data", str(shard_dir), "--tta", "dihedral", "--out", str(tmp_path / "ev8")]) == 0
    assert json.loads((tmp_path / "ev8" / "eval.json").read_text())["tta"] == "dihedral"
    v = train(Config.model_validate(tiny_config(tmp_path / "c", shard_dir, epochs=2,
                                                **{"eval.tta": "flips", "eval.tta_val": True}))).summary
    lines = [json.loads(x) for x in (tmp_path / "c" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/acc" in x for x in lines) and v["test/samples"] == 15


def test_probe_features_are_cached_and_reused(tmp_path, shard_dir):
    cfg = _probe_config(tmp_path, shard_dir, epochs=0)
    first = train(cfg).summary
    cached = list((tmp_path / "run" / "feature_cache").glob("probe-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    cfg.resume = "auto"
    with pytest.raises(FinishedRunError, match=r"is a finished run \(0 epochs, test acc"):
        train(cfg)  # a probe-only run is finished too, though it leaves no checkpoint
    cfg.epochs = 1
    more = train(cfg).summary  # fine-tuning after the probe: its features come from the cache
    assert cached[0].stat().st_mtime_ns == stamp and more["epochs_trained"] == 1 and first["epochs_trained"] == 0


def test_dtl_compare_runs_the_three_arms_on_the_same_split(tmp_path, shard_dir):
    import subprocess
    import sys

    from conftest import write_config

    cfg = tiny_config(tmp_path, shard_dir, epochs=2, **{
        "finetune.probe": {"enabled": True, "epochs": 30, "lr": 0.05},
        "finetune.stages": [{"epoch": 0, "train": 3}, {"epoch": 1, "train": "all"}]})
    path = write_config(tmp_path / "c.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "compare", "--config", str(path), "--out",
                        str(tmp_path / "cmp"), "--seeds", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["arm"] for row in result["rows"]] == ["linear probe", "full, one lr", "your plan"]
    assert all(row["test/acc"] is not None and row["wall_s"] > 0 for row in result["rows"])
    assert "linear probe" in r.stdout and "your plan" in r.stdout
    # Again into the same --out: every arm finished with the same settings is read back, not retrained.
    arm_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("summary.json")}
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "compare", "--config", str(path), "--out",
                        str(tmp_path / "cmp"), "--seeds", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count("finished earlier: read back") == 3, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in arm_files} == arm_files
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"] == result["summary"]
    # A setting that changes only how a run is carried out (here: no report) is still the same run.
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "compare", "--config", str(path), "--out",
                        str(tmp_path / "cmp"), "--seeds", "0", "--set", "report=false"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count("finished earlier: read back") == 3, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in arm_files} == arm_files
    # One that changes what is computed is not: the learning rate, or the loader workers (the stream's
    # slots are ranks x workers, so they change the order).
    from dtl.recipe_compare import _finished_row, arm_overrides
    out = tmp_path / "cmp" / "your_plan-seed0"
    for extra, same in ((["report=false"], True), (["optim.lr=0.02"], False), (["data.num_workers=2"], False)):
        overrides = [*arm_overrides("your plan", 0, out, extra, None), "resume=never"]
        assert (_finished_row(out, overrides, str(path)) is not None) == same, extra
    # Such a compare into the same --out would replace finished runs: refused before any arm trains.
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "compare", "--config", str(path), "--out",
                        str(tmp_path / "cmp"), "--seeds", "0", "--set", "optim.lr=0.02"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "holds a finished run with other settings (optim.lr: 0.01 -> 0.02)" in r.stderr, \
        r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in arm_files} == arm_files


def test_dtl_compare_refuses_a_bad_config_before_any_arm_trains(tmp_path, shard_dir):
    import subprocess
    import sys

    from conftest import write_config

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    for args, said in ((["--set", "optim.lrr=1"], "optim.lrr"), (["--config", str(tmp_path / "no.yaml")], "no.yaml"),
                       (["--set", "data.test_split=null"], "data.test_split is null"),
                       (["--set", "data.test_split=holdout"], "has no split 'holdout' (data.test_split)"),
                       (["--seeds", "0", "0"], "each seed once"),
                       (["--out", str(path)], "is a file; compare writes a folder")):
        out = [] if "--out" in args else ["--out", str(tmp_path / "cmp")]
        r = subprocess.run([sys.executable, "-m", "dtl.cli", "compare", "--config", str(path), *out,
                            *args], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and said in r.stderr, r.stderr[-2000:]
        assert not list((tmp_path / "cmp").glob("*/summary.json"))


def test_probe_without_a_validation_split_stops_on_its_training_metric(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir, epochs=1, **{"data.val_split": None,
                                                        "finetune.probe": {"enabled": True, "epochs": 5}})
    s = train(Config.model_validate(cfg)).summary
    assert s["test/acc"] is not None and (tmp_path / "run" / "probe.safetensors").is_file()


def test_ema_is_evaluated_selectable_and_resumes_exactly(tmp_path, shard_dir):
    ema = {"ema.enabled": True, "ema.decay": 0.9}
    full = train(Config.model_validate(tiny_config(tmp_path / "a", shard_dir, **ema))).summary
    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train/acc" in r]
    assert all("val_ema/acc" in r for r in epochs) and full["best_weights"] in ("model", "ema")
    best = max(max(r["val/acc"], r["val_ema/acc"]) for r in epochs)
    assert full["val/best_acc"] == pytest.approx(best)
    cfg = Config.model_validate(tiny_config(tmp_path / "b", shard_dir, stop_after_steps=7, **ema))
    assert train(cfg).stopped
    ckpts = sorted((tmp_path / "b" / "run" / "checkpoints").glob("ckpt-*"))
    assert (ckpts[-1] / "ema.safetensors").is_file()   # safetensors, not a pickle
    cfg.stop_after_steps = None
    train(cfg)
    for name in ("model.safetensors", "best.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "run" / name)), load_file(str(tmp_path / "b" / "run" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_lr_find_writes_a_curve_and_suggests_a_rate(tmp_path, shard_dir):
    import subprocess
    import sys

    from conftest import write_config

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "lr-find", "--config", str(path), "--stage", "1",
                        "--steps", "40", "--out", str(tmp_path / "lr")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 10_000
    assert len(found["trainable_groups"]) == 3 and 1e-7 <= found["suggested_lr"] <= 10
    assert f"suggested optim.lr={found['suggested_lr']:.2e}" in r.stdout
    assert "requires_grad" not in r.stderr, r.stderr[-2000:]  # it once warned on float(loss) at every run
    bad = subprocess.run([sys.executable, "-m", "dtl.cli", "lr-find", "--config", str(path), "--stage", "9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "the plan has stages 0..2" in bad.stderr
    # batches larger than the training samples: refused in one line (the sweep never moved and hung)
    big = subprocess.run([sys.executable, "-m", "dtl.cli", "lr-find", "--config", str(path), "data.batch_size=64"],
                         capture_output=True, text=True, timeout=120)
    assert big.returncode == 2 and "fewer than data.batch_size = 64" in big.stderr, big.stderr[-2000:]


def test_lr_find_suggests_a_rate_on_the_descent_not_the_smoothing_start():
    """A sweep whose smoothed loss drops at its first steps (the running average settling) and falls
    for real near 1e-2: the suggestion is on that descent, before the minimum (it was 1.2e-7)."""
    import math

    from dtl.lr_finder import _steepest

    lrs = [1e-7 * (1e8 ** (i / 99)) for i in range(100)]
    losses = []
    for i, lr in enumerate(lrs):
        settle = 0.3 * math.exp(-i)                            # steep artefact at steps 0-2
        descent = 0.4 / (1 + math.exp(-(math.log10(lr) + 2.5) * 4))   # falls around 3e-3
        climb = max(0.0, math.log10(lr) + 1.5) * 2              # diverges past ~3e-2
        losses.append(1.6 + settle - descent + climb)
    suggested = _steepest(lrs, losses)
    low = lrs[min(range(100), key=losses.__getitem__)]
    assert 1e-4 < suggested < low, (suggested, low)
    rising = [2.0 + i for i in range(20)]                        # no descent at all: a tenth of the minimum's rate
    assert _steepest(lrs[:20], rising) == lrs[0] / 10


def test_mixup_cutmix_and_random_erasing_train_and_resume_exactly(tmp_path, shard_dir):
    aug = {"data.augment.mixup": 0.4, "data.augment.cutmix": 1.0, "data.augment.random_erasing": 0.25}
    full = train(Config.model_validate(tiny_config(tmp_path / "a", shard_dir, **aug))).summary
    assert full["test/samples"] == 15
    cfg = Config.model_validate(tiny_config(tmp_path / "b", shard_dir, stop_after_steps=7, **aug))
    assert train(cfg).stopped
    cfg.stop_after_steps = None
    train(cfg)
    a = load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixing_needs_an_even_batch_and_no_class_weights(tmp_path, shard_dir):
    from dtl.run_config import ConfigError, load_config
    from conftest import write_config

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    with pytest.raises(ConfigError, match="batch_size must be even"):
        load_config(path, ["data.augment.mixup=0.2", "data.batch_size=7"])
    with pytest.raises(ConfigError, match="class_weights does not combine"):
        load_config(path, ["data.augment.cutmix=1.0", "data.class_weights=true"])


def test_probe_without_install_is_a_candidate_only(tmp_path, shard_dir):
    """probe.install=false: best.safetensors holds the probe's head, fine-tuning starts from the fresh one."""
    cfg = _probe_config(tmp_path, shard_dir, epochs=0, **{"finetune.probe": {
        "enabled": True, "epochs": 60, "patience": 20, "lr": 0.05, "install": False}})
    result = train(cfg)
    assert result.summary["best_epoch"] == 0 and "test_final/acc" in result.summary  # best and final differ
    assert result.summary["best_weights"] == "probe"
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    w = "classifier.weight"
    assert not torch.equal(best[w], final[w])
    assert final[w].abs().max() < 0.05 < best[w].abs().max()   # the fresh head starts near zero (std 0.01)
    probe = load_file(str(tmp_path / "run" / "probe.safetensors"))  # the probe's model, kept whatever is selected
    assert probe.keys() == best.keys() and all(torch.equal(probe[k], best[k]) for k in probe)


def test_dihedral_tta_averages_the_eight_symmetries_of_the_square():
    from dtl.evaluation import predict_logits, tta_views

    x = torch.randn(2, 3, 8, 8)
    views = tta_views(x, "dihedral")
    expected = [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)]
    assert len(views) == 8
    for e in expected:  # each symmetry exactly once
        assert sum(torch.equal(v, e) for v in views) == 1
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 5))
    probs = torch.stack([net(e).softmax(1) for e in expected]).mean(0)
    assert torch.allclose(predict_logits(net, x, "dihedral").exp(), probs, atol=1e-6)


def test_quarter_turn_augmentation_turns_the_image_with_its_probability():
    from PIL import Image

    from conftest import make_image
    from dtl.data_pipeline import build_transform
    from dtl.run_config import AugmentConfig

    pre = {"input_size": [3, 40, 40], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    still = dict(hflip=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    img = make_image(1, seed=3, size=40)
    plain = build_transform(pre, True, AugmentConfig(**still))
    turned = plain(img.transpose(Image.Transpose.ROTATE_90))
    assert not torch.equal(turned, plain(img))
    assert torch.equal(build_transform(pre, True, AugmentConfig(rot90=1.0, **still))(img), turned)
    half = build_transform(pre, True, AugmentConfig(rot90=0.5, **still))
    torch.manual_seed(0)
    n = sum(torch.equal(half(img), turned) for _ in range(200))
    assert 70 < n < 130, n  # about half of the draws
