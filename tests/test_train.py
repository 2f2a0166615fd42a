"""End-to-end runs of dtl/train.py on tiny real models and real shards (single process, CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import wandb_records
from conftest import CLASSES, REPO, tiny_config, write_config
from dtl.checkpoints import CheckpointError, list_checkpoints, load_exported, read_train_state
from dtl.run_config import Config
from dtl.train import train


def _run(tmp_path, shard_dir, **extra) -> tuple[dict, Path]:
    cfg = Config.model_validate(tiny_config(tmp_path, shard_dir, **extra))
    return train(cfg).summary, Path(cfg.output_dir)


def test_full_run_writes_the_run_directory_and_a_wandb_offline_run(tmp_path, shard_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    summary, out = _run(tmp_path, shard_dir, **{"wandb.enabled": True, "wandb.project": "dtl-test"})
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "best.safetensors",
                 "wandb_run_id"):
        assert (out / name).is_file(), name
    assert list_checkpoints(out / "checkpoints")
    # summary: test metrics over every test sample, best epoch
    saved = json.loads((out / "summary.json").read_text())
    assert saved["test/samples"] == 15 and 0 <= saved["test/acc"] <= 1 and "test/macro_f1" in saved
    assert sum(map(sum, saved["test/confusion"])) == 15
    assert 1 <= saved["best_epoch"] <= 3 and saved["val/samples"] > 0   # numbered as the console does
    # metrics.jsonl: one record per step and one per epoch, with per-group lrs and trainable counts
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train/acc" in r]
    assert [r["stage"] for r in epochs] == [0, 1, 2]
    assert epochs[0]["trainable_params"] < epochs[1]["trainable_params"] < epochs[2]["trainable_params"]
    assert any(k.startswith("lr/") and k.endswith("_head") for k in epochs[0])
    # W&B: a real offline run whose history holds what we logged
    run_id = (out / "wandb_run_id").read_text()
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    hist = wandb_records.history(files[0])
    val_accs = [h["val/acc"] for h in hist if "val/acc" in h]
    assert val_accs == pytest.approx([r["val/acc"] for r in epochs]), \
        [(h.get("_step"), sorted(h)[:3]) for h in hist if len(h) > 12]   # which rows the file holds
    assert wandb_records.config(files[0])["model"]["backbone"] == "test_efficientnet"
    assert wandb_records.summary(files[0])["test/acc"] == pytest.approx(saved["test/acc"])


def test_exported_model_predicts_without_the_training_config(tmp_path, shard_dir, image_folder):
    summary, out = _run(tmp_path, shard_dir, epochs=2)
    model, meta = load_exported(out / "model.safetensors")
    assert meta["classes"] == CLASSES and meta["backbone"] == "test_efficientnet"
    assert meta["preprocessing"]["input_size"] == [3, 32, 32]
    from dtl.backbones import create_classifier

    ref = create_classifier("test_efficientnet", 3)
    ref.load_state_dict(load_file(str(out / "model.safetensors")))
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "predict", str(out / "model.safetensors"),
                        str(next((image_folder / "circle").glob("*.jpg")))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pred = json.loads(r.stdout.splitlines()[0])["predictions"][0]
    assert pred["class"] in CLASSES and 0 < pred["prob"] <= 1


def test_learns_the_synthetic_task(tmp_path, shard_dir):
    summary, _ = _run(tmp_path, shard_dir, epochs=6, **{
        "finetune.stages": [{"epoch": 0, "train": "all"}], "optim.lr": 0.02, "data.augment.crop_scale": [0.9, 1.0]})
    assert summary["test/acc"] > 0.6  # chance is 0.33


def test_resume_continues_at_the_right_epoch_with_identical_weights(tmp_path, shard_dir, capsys):
    # Dropout on a CPU draws from the global generator, which no loader may touch: the uninterrupted
    # run's loaders keep their workers, the resumed run's start afresh (it broke bitwise resume once).
    extra = {"data.num_workers": 2, "model.drop_rate": 0.3}
    full, full_out = _run(tmp_path / "a", shard_dir, **extra)
    # the same run, stopped mid-epoch 1 (just after the first stage change), then resumed
    cfg = tiny_config(tmp_path / "b", shard_dir, stop_after_steps=7, **extra)
    stopped = train(Config.model_validate(cfg))
    out = Path(cfg["output_dir"])
    state = read_train_state(list_checkpoints(out / "checkpoints")[-1])
    # 45 samples, 2 workers: 22 per worker, 2 batches of 8 each, 4 steps per epoch
    assert stopped.stopped and (state.epoch, state.batch_in_epoch, state.step, state.stage) == (1, 3, 7, 1)
    cfg.update(stop_after_steps=None, resume="auto")
    capsys.readouterr()
    resumed = train(Config.model_validate(cfg))
    assert "with a changed config: stop_after_steps: 7 -> None" in capsys.readouterr().out  # said, not silent
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train/acc" in r] == [1, 2, 3]   # epoch 1 before the stop, 2 and 3 after the resume
    assert resumed.steps == full["steps"] == 12
    full_records = [json.loads(line) for line in (full_out / "metrics.jsonl").read_text().splitlines()]
    lrs = lambda recs: [{k: v for k, v in r.items() if k.startswith("lr/")} for r in recs if "train/acc" in r]
    assert lrs(records) == lrs(full_records)                              # same groups, same rates
    a, b = load_file(str(full_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_from_another_model_is_refused(tmp_path, shard_dir):
    _, out = _run(tmp_path, shard_dir, epochs=1)
    cfg = tiny_config(tmp_path, shard_dir, epochs=2, resume="auto", **{"model.backbone": "test_resnet"})
    with pytest.raises(CheckpointError, match="backbone: checkpoint has 'test_efficientnet', this run has 'test_resnet'"):
        train(Config.model_validate(cfg))


def test_resume_never_refuses_to_write_over_an_earlier_run(tmp_path, shard_dir):
    _, out = _run(tmp_path, shard_dir, epochs=1)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    cfg = tiny_config(tmp_path, shard_dir, epochs=2, resume="never")
    with pytest.raises(CheckpointError, match="resume=never, but .*ckpt-.* holds an earlier run's checkpoint"):
        train(Config.model_validate(cfg))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_bf16_autocast_on_cpu_with_accumulation_and_clipping(tmp_path, shard_dir):
    summary, out = _run(tmp_path, shard_dir, epochs=1, mixed_precision="bf16", **{
        "optim.grad_accum_steps": 2, "optim.clip_grad_norm": 1.0, "optim.label_smoothing": 0.1,
        "finetune.stages": [{"epoch": 0, "train": "all"}]})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 45 train samples, batch 8 -> 5 batches -> 2 optimizer steps of 2 accumulated batches
    assert summary["steps"] == 2
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records if "train/loss" in r)


def test_script_entry_point_with_overrides(tmp_path, shard_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir))
    r = subprocess.run([sys.executable, str(REPO / "dtl" / "train.py"), "--config", str(path), "epochs=1",
                        f"output_dir={tmp_path / 'script'}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch 1/1 stage 0" in r.stdout
    assert "test: acc" in r.stdout and "confusion matrix" in r.stdout
    assert json.loads((tmp_path / "script" / "summary.json").read_text())["epochs"] == 1


def test_class_weights_from_dataset_counts(tmp_path, shard_dir):
    from dtl.data_pipeline import class_weights
    from dtl.shard_stream import ShardStream, SplitSource, StreamOptions

    src = SplitSource("train", ["x.tar"], [2624], 2624, class_counts=[1508, 295, 106, 715])
    w = class_weights(ShardStream(src, lambda i: i, StreamOptions(classes=list("abcd"))), 4)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[2] / w[0] == pytest.approx(1508 / 106)          # inverse frequency
    soft = class_weights(ShardStream(src, lambda i: i, StreamOptions(classes=list("abcd"))), 4, power=0.5)
    assert soft[2] / soft[0] == pytest.approx((1508 / 106) ** 0.5)  # square root: softer
    summary, _ = _run(tmp_path, shard_dir, epochs=1, **{"data.class_weights": True})
    assert summary["test/samples"] == 15


def test_uint8_batches_normalised_on_the_device_train_as_float_batches_do(tmp_path, shard_dir):
    """data.normalize_on_device (the default) sends the training images as uint8 and normalises them
    after the copy, as timm's prefetcher: the same inputs up to float rounding, so the same model."""
    from dtl.data_pipeline import build_data
    from dtl.backbones import create_classifier, preprocessing

    cfg = Config.model_validate(tiny_config(tmp_path / "x", shard_dir))
    pre = preprocessing(create_classifier("test_efficientnet", 3), 32, None)
    data = build_data(cfg, pre, CLASSES, 0, 1, None)
    data.train.set_epoch(0)
    assert next(iter(data.loader(data.train)))["image"].dtype == torch.uint8
    assert next(iter(data.loader(data.val)))["image"].dtype == torch.float32   # evaluation stays float
    erasing = cfg.model_copy(deep=True)
    erasing.data.augment.random_erasing = 0.5                                 # needs normalised floats
    data = build_data(erasing, pre, CLASSES, 0, 1, None)
    data.train.set_epoch(0)
    assert next(iter(data.loader(data.train)))["image"].dtype == torch.float32

    stages = {"finetune.stages": [{"epoch": 0, "train": "all"}], "epochs": 2}
    on, on_out = _run(tmp_path / "on", shard_dir, **stages)
    off, off_out = _run(tmp_path / "off", shard_dir, **stages, **{"data.normalize_on_device": False})
    # Adam turns a rounding-sized change of a near-zero gradient into a full step, so weights can
    # differ by ~lr here and there; what the runs learn does not
    losses = [[json.loads(x)["train/loss"] for x in (o / "metrics.jsonl").read_text().splitlines() if '"train/acc"' in x]
              for o in (on_out, off_out)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert on["test/acc"] == off["test/acc"] and on["test/loss"] == pytest.approx(off["test/loss"], rel=1e-2)


def test_compiled_model_trains_through_stage_changes_like_eager(tmp_path, shard_dir):
    """model.compile: torch.compile in place (inductor, real C++ codegen on the CPU). Every stage
    change of a 4-stage unfreeze recompiles, and none hits Dynamo's recompile limit (past it the
    last stages would run uncompiled); the EMA copy is a separate, uncompiled module; exports keep
    their keys; the run learns what the eager run learns."""
    import logging

    from torch._dynamo.utils import counters

    warned: list[str] = []  # torch's loggers do not propagate to pytest's caplog
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("torch._dynamo.convert_frame").addHandler(handler)

    extra = {"finetune.stages": [{"epoch": 0, "train": 1}, {"epoch": 1, "train": 2}, {"epoch": 2, "train": 3},
                                 {"epoch": 3, "train": "all"}], "epochs": 4,
             "ema.enabled": True, "ema.decay": 0.9, "finetune.cache_frozen": False}
    eager, eager_out = _run(tmp_path / "eager", shard_dir, **extra)
    assert counters["stats"]["unique_graphs"] == 0
    compiled, out = _run(tmp_path / "compiled", shard_dir, **extra, **{"model.compile": True})
    # graphs: training in each of the 4 stages, evaluation (eval mode), short last batches
    assert counters["stats"]["unique_graphs"] >= 5, dict(counters["stats"])
    logging.getLogger("torch._dynamo.convert_frame").removeHandler(handler)
    assert not [m for m in warned if "recompile_limit" in m]
    a, b = load_file(str(eager_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    losses = [[json.loads(x)["train/loss"] for x in (o / "metrics.jsonl").read_text().splitlines() if '"train/acc"' in x]
              for o in (eager_out, out)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    assert compiled["test/acc"] == pytest.approx(eager["test/acc"], abs=0.05)
    ema = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "ema.safetensors"))
    assert any(not torch.equal(ema[k], b[k]) for k in b if k in ema)  # the average, not the live weights
