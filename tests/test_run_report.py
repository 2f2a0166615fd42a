"""The report on disk: pictures that exist, are non-trivial and have the expected size; CSV and markdown."""
import csv
from pathlib import Path

import pytest
from PIL import Image

from conftest import CLASSES, tiny_config
from dtl.run_config import Config
from dtl.train import train


@pytest.mark.parametrize("probe", [False, True])
def test_report_pictures_csv_and_markdown(tmp_path, shard_dir, probe):
    extra = {"finetune.probe": {"enabled": True, "lr": 0.05}} if probe else {}
    summary = train(Config.model_validate(tiny_config(tmp_path, shard_dir, report=True, **extra))).summary
    out = tmp_path / "run" / "report"
    for name, size in (("curves.png", (1200, 800)), ("confusion.png", (1100, 500)), ("top_losses.png", None)):
        path = out / name
        assert path.stat().st_size > 15_000, name
        if size:
            assert Image.open(path).size == size, name
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in rows] == CLASSES and sum(int(r["support"]) for r in rows) == 15
    assert len(list(csv.DictReader(open(out / "top_losses.csv")))) == 15  # fewer test images than 16
    md = (out / "report.md").read_text()
    assert f"{summary['test/acc']:.4f}" in md and "![confusion matrix](confusion.png)" in md
    assert "Trained on cross-entropy, with the data's class frequencies; test-time augmentation: none." in md


@pytest.mark.parametrize("overrides, line", [
    ([], "Trained on cross-entropy, label smoothing 0.1, with class-balanced sampling 0.5 (class shares ~ count^0.5); "
         "test-time augmentation: flips; predictions under the data's class prior (eval.prior_correction)."),
    (["optim.ordinal_sigma=0.5", "data.balanced_sampling=1", "eval.prior_correction=false"],
     "Trained on ordinal soft labels (SORD, sigma 0.5 levels), label smoothing 0.1, with class-balanced sampling 1 "
     "(equal class shares); test-time augmentation: flips."),
    (["data.augment.mixup=0.2", "data.augment.cutmix=1.0", "data.balanced_sampling=0", "optim.label_smoothing=0"],
     "Trained on cross-entropy on mixup alpha 0.2 / cutmix alpha 1 batches, with the data's class frequencies; "
     "test-time augmentation: flips."),
    (["optim.ordinal_sigma=0.5", "data.balanced_sampling=0", "data.class_weights=true", "data.class_weight_power=0.5",
      "eval.tta=none"],
     "Trained on ordinal soft labels (SORD, sigma 0.5 levels), label smoothing 0.1, with class weights ~ count^-0.5; "
     "test-time augmentation: none; predictions under the data's class prior (eval.prior_correction)."),
    # weights of power 0 tilt nothing, so nothing is corrected
    (["data.balanced_sampling=0", "data.class_weights=true", "data.class_weight_power=0"],
     "Trained on cross-entropy, label smoothing 0.1, with equal class weights (data.class_weight_power 0); "
     "test-time augmentation: flips."),
    (["data.balanced_sampling=0", "data.augment.mixup=0.2", "data.augment.mix_prob=0.3"],
     "Trained on cross-entropy, label smoothing 0.1 on mixup alpha 0.2 batches (a batch mixed with probability 0.3), "
     "with the data's class frequencies; test-time augmentation: flips."),
])
def test_report_says_what_the_numbers_were_measured_under(overrides, line):
    from dtl.run_config import load_config
    from dtl.run_report import recipe_line
    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    assert recipe_line(load_config(quick, overrides)) == line


def test_dtl_eval_and_predict_at_scale(tmp_path, shard_dir, image_folder):
    import json
    import subprocess
    import sys

    train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    weights = tmp_path / "run" / "model.safetensors"
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "eval", str(weights), "--data", str(shard_dir),
                        "--out", str(tmp_path / "ev"), "--tta", "hflip"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["samples"] == 15 and sum(map(sum, ev["confusion"])) == 15 and "test: acc" in r.stdout
    assert (tmp_path / "ev" / "report" / "confusion.png").stat().st_size > 15_000
    report = (tmp_path / "ev" / "report" / "report.md").read_text()
    assert f"{ev['acc']:.4f}" in report and "![confusion matrix](confusion.png)" in report and "| circle |" in report
    (tmp_path / "a_file").write_text("mine")
    for args, said in ((["eval", str(weights), "--data", str(shard_dir), "--out", str(tmp_path / "a_file")], "is a file"),
                       (["eval", str(weights), "--data", str(shard_dir), "--out", str(tmp_path / "ev")],
                        "already holds eval.json and report: pass another --out"),
                       (["predict", str(weights), str(tmp_path / "ev" / "*.nothing")], "no file matches"),
                       (["predict", str(weights), str(tmp_path / "ev" / "report"), "--csv", str(tmp_path)], "a folder"),
                       (["predict", str(weights), str(image_folder / "circle"), "--csv", str(tmp_path / "no" / "p.csv")],
                        "does not exist"),
                       (["predict", str(tmp_path / "run"), str(image_folder / "circle")], "is a folder: pass an exported file"),
                       (["predict", str(weights), str(image_folder / "circle"), "--device", "gpu",
                         "--csv", str(tmp_path / "a_file")], "--device gpu: not a device name")):
        r = subprocess.run([sys.executable, "-m", "dtl.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and said in r.stderr, (args, r.stderr[-2000:])
    assert (tmp_path / "a_file").read_text() == "mine"
    (image_folder / "broken.jpg").write_bytes(b"no")
    try:
        r = subprocess.run([sys.executable, "-m", "dtl.cli", "predict", str(weights), str(image_folder / "circle"),
                            str(image_folder / "square" / "*.png"), str(image_folder / "broken.jpg"),
                            "--csv", str(tmp_path / "p.csv"), "--batch-size", "7"], capture_output=True, text=True)
    finally:
        (image_folder / "broken.jpg").unlink()
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert r.returncode == 2 and len(rows) == 24 + 6 + 1
    assert rows[-1]["error"] and all(row["class"] in CLASSES for row in rows[:-1])


def test_dtl_eval_reads_labels_from_the_field_the_model_trained_on(tmp_path):
    """Shards labelled in `txt`: the export records data.label_field, so `dtl eval` reads the same field
    without being told; `--label-field` overrides it, and a field the shards lack is named in one line."""
    import json
    import subprocess
    import sys

    import webdataset as wds

    from conftest import encode, make_image
    from dtl.shard_writer import index_shards

    for split, n in (("train", 24), ("test", 9)):
        with wds.ShardWriter(str(tmp_path / f"{split}-%d.tar"), maxcount=100) as sink:
            for i in range(n):
                sink.write({"__key__": f"{split}{i}", "jpg": encode(make_image(i % 3, i + 100 * len(split))),
                            "txt": CLASSES[i % 3]})
    index_shards(tmp_path, {"train": "train-0.tar", "test": "test-0.tar"}, CLASSES, "txt")
    index = json.loads((tmp_path / "dataset.json").read_text())
    cfg = tiny_config(tmp_path, tmp_path, epochs=1, **{"data.label_field": "txt", "data.val_split": None})
    train(Config.model_validate(cfg))
    weights = str(tmp_path / "run" / "model.safetensors")

    def dtl_eval(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dtl.cli", "eval", weights, "--data", str(tmp_path),
                               "--num-workers", "0", *extra], capture_output=True, text=True)
    r = dtl_eval()
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval-model-test" / "eval.json").read_text())["samples"] == 9
    bad = dtl_eval("--label-field", "cls", "--out", str(tmp_path / "ev2"))
    assert bad.returncode == 2 and "missing label field 'cls'" in bad.stderr and "Traceback" not in bad.stderr, \
        bad.stderr[-2000:]
    assert index["splits"]["test"]["count"] == 9
    none = dtl_eval("--label-field", "cls", "--on-error", "skip", "--out", str(tmp_path / "ev3"))
    assert none.returncode == 2 and "no sample of split 'test' could be read" in none.stderr, none.stderr[-2000:]
    assert not (tmp_path / "ev3" / "eval.json").exists()  # no invented zeros


def test_tensorboard_scalars_and_confusion_figures(tmp_path, shard_dir):
    """TensorBoard as the second tracker (W&B off here): read the event files back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, shard_dir, epochs=2, tensorboard=True, report=False)
    train(Config.model_validate(cfg))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "val/acc", "val/macro_f1", "epoch", "test/acc"} <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("epoch")] == [1.0, 2.0]
    val_acc = [e.value for e in acc.Scalars("val/acc")]
    assert len(val_acc) == 2 and all(0 <= v <= 1 for v in val_acc)
    assert {"val/confusion", "test/confusion"} <= set(tags["images"])
    figures = acc.Images("val/confusion")
    assert len(figures) == 2 and figures[0].width > 500 and figures[0].height > 300


def test_a_resumed_report_drops_the_records_its_checkpoint_had_not_reached(tmp_path):
    """Killed after an epoch's record but before its checkpoint: the resumed process logs that epoch
    again, so the history read back stops at the checkpoint's step (no curve doubling back), and
    metrics.jsonl drops the records the resumed run redoes."""
    import json
    from types import SimpleNamespace

    from dtl.run_report import RunReport

    rows = [{"step": 0, "epoch": 0, "probe/epochs": 9, "val/acc": 0.5},
            {"step": 2, "epoch": 0, "train/loss_step": 1.0}, {"step": 4, "epoch": 1, "train/acc": 0.6},
            {"step": 6, "epoch": 1, "train/loss_step": 0.8}, {"step": 8, "epoch": 2, "train/acc": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = RunReport()
    report.run_start(SimpleNamespace(out=tmp_path, state=SimpleNamespace(step=4, epoch=1)))  # resumed at epoch 1's end
    assert [r["epoch"] for r in report.epochs] == [1] and [r["step"] for r in report.steps] == [2]
    assert report.probe["probe/epochs"] == 9
    # a record cut short by a kill or a full disk: metrics.jsonl drops it, and the resumed run writes on
    from dtl.run_observers import MetricsFile

    path = tmp_path / "metrics.jsonl"
    redone = [{"step": 8, "epoch": 3, "train/acc": 0.71},      # the next epoch's record at the checkpoint's step
              {"step": 9, "epoch": 2, "train/loss_step": 0.7}]  # after the checkpoint (step 8): logged again
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *redone]) + "\0\0\0\n"  # NULs after a crash
                    + '{"step": 10, "epoch": 2, "train/lo')
    run = SimpleNamespace(out=tmp_path, state=SimpleNamespace(step=8, epoch=2), resumed_from=tmp_path / "ckpt")
    metrics, report = MetricsFile(path), RunReport()
    for observer in (metrics, report):  # the order the run attaches them in
        observer.run_start(run)
    assert [r["epoch"] for r in report.epochs] == [1, 2]
    metrics.write({"step": 10, "epoch": 2, "train/loss_step": 0.5})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[:-1] == rows and lines[-1]["train/loss_step"] == 0.5  # one record per step, each line whole
    # a run starting afresh (no checkpoint) in this folder: the earlier records are moved aside, not lost
    before = path.read_text()
    MetricsFile(path).run_start(SimpleNamespace(out=tmp_path, state=SimpleNamespace(step=0, epoch=0), resumed_from=None))
    aside = list(tmp_path.glob("metrics.*.jsonl"))
    assert not path.exists() and len(aside) == 1 and aside[0].read_text() == before


def test_curves_mark_only_the_stage_changes_the_run_reached(tmp_path, shard_dir):
    """A plan whose third stage starts after the run's last epoch: curves.png draws one stage line."""
    from dtl.backbones import create_classifier
    from dtl.finetune_plan import FinetunePlan
    from dtl.layer_groups import layer_groups
    from dtl.run_report import stage_change_steps

    cfg = tiny_config(tmp_path, shard_dir, epochs=3, report=True, **{"finetune.stages": [
        {"epoch": 0, "train": 1}, {"epoch": 2, "train": 3}, {"epoch": 4, "train": "all"}]})
    run = train(Config.model_validate(cfg))
    steps = run.summary["steps"]
    assert steps == 15
    c = Config.model_validate(cfg)
    plan = FinetunePlan(c.finetune, layer_groups(create_classifier("test_efficientnet", 3, pretrained=False), "coarse"),
                        c.optim.lr)
    assert stage_change_steps(plan, 5, steps) == [10]             # the stage at epoch 4 never ran
    assert stage_change_steps(plan, 5, 10) == []                  # nor, at step 10, the one at epoch 2 (steps 11-15)
    assert (tmp_path / "run" / "report" / "curves.png").stat().st_size > 20_000


def test_a_report_without_validation_says_the_test_is_the_final_weights(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir, epochs=1, report=True, **{"data.val_split": None})
    summary = train(Config.model_validate(cfg)).summary
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert summary["best_epoch"] is None and "epoch None" not in report
    assert "no validation split, so no selection: the test is the final weights' (model.safetensors)." in report


def test_validation_tables_are_labelled_with_the_consoles_epoch():
    """The probe's validation (before any step) is epoch 0, an epoch's the epoch it finishes, a run's
    final one its last epoch: W&B's val/predictions once called the probe's epoch 1."""
    from types import SimpleNamespace

    from dtl.run_observers import eval_epoch

    def at(step: int, epoch: int):
        return SimpleNamespace(state=SimpleNamespace(step=step, epoch=epoch), cfg=SimpleNamespace(epochs=3))
    assert [eval_epoch(at(0, 0)), eval_epoch(at(56, 0)), eval_epoch(at(112, 1)), eval_epoch(at(168, 3))] == [0, 1, 2, 3]
