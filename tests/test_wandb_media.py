"""What the offline W&B run holds: tables, charts, images, artifacts; read from the run's files."""
import glob
import json
from pathlib import Path

import wandb_records
from conftest import tiny_config
from dtl.run_config import Config
from dtl.train import train
from dtl.wandb_media import sample_keys


def _run_dir(out: Path) -> Path:
    """The latest process's run directory: the one whose history reaches the highest W&B step.

    Not the name: it holds the start second, which two quick processes can share or reorder.
    """
    run_id = (out / "wandb_run_id").read_text()
    dirs = (out / "wandb").glob(f"offline-run-*-{run_id}*")  # W&B adds "-1" when both started in one second
    return max(dirs, key=lambda d: max(h.get("_step", -1) for h in
                                       wandb_records.history(next(d.glob("run-*.wandb")))))


def _table(run_dir: Path, key: str) -> dict:
    """The last-logged version of a table (file names carry W&B's own step counter)."""
    split, name = key.split("/")
    files = (run_dir / "files" / "media" / "table" / split).glob(f"{name}_*.table.json")
    latest = max(files, key=lambda f: int(f.name[len(name) + 1:].split("_")[0]))
    return json.loads(latest.read_text())


def test_a_run_stopped_before_its_first_validation_still_logs_the_sample_once(tmp_path, shard_dir, monkeypatch):
    """Preempted in epoch 1 (no validation yet): the resumed process logs the sample table, once."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(tmp_path, shard_dir, epochs=2, stop_after_steps=3, **{"wandb.enabled": True, "wandb.project": "t"})
    assert train(Config.model_validate(cfg)).stopped
    cfg["stop_after_steps"] = None
    train(Config.model_validate(cfg))
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    every = [a for r in runs for a in wandb_records.artifacts(next(r.glob("run-*.wandb")))]
    assert len(runs) == 2 and len([a for a in every if "valsample" in a.name]) == 1


def test_tables_charts_and_artifacts_in_the_offline_run(tmp_path, shard_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(tmp_path, shard_dir, stop_after_steps=7, **{"wandb.enabled": True, "wandb.project": "t"})
    assert train(Config.model_validate(cfg)).stopped           # stop in epoch 2, then resume: one W&B run
    cfg["stop_after_steps"] = None
    summary = train(Config.model_validate(cfg)).summary
    out = tmp_path / "run"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2                                       # two processes, one run id
    run_dir = _run_dir(out)
    hist = wandb_records.history(next(run_dir.glob("run-*.wandb")))
    assert [h["epoch"] for h in hist if "val/acc" in h] == [2, 3]  # the resumed process: epochs 2 and 3
    conf = _table(run_dir, "val/confusion_table")
    assert sum(row[2] for row in conf["data"]) == summary["val/samples"]
    val_keys = [row[0] for row in _table(run_dir, "val/predictions")["data"]]
    all_val = sorted({k for r in runs for f in r.glob("files/media/table/val/predictions_*") for k in
                      [row[0] for row in json.loads(f.read_text())["data"]]})
    assert val_keys == sample_keys(all_val, 0)                  # the seeded sample, every epoch
    for name in ("test/pr_curve_table", "test/roc_curve_table", "test/top_losses", "test/per_class"):
        assert _table(run_dir, name)["data"], name
    every = [a for r in runs for a in wandb_records.artifacts(next(r.glob("run-*.wandb")))]
    kinds = [(a.type, a.name) for a in every if a.type in ("model", "dataset")]
    assert [k for k, _ in kinds] == ["dataset", "model", "model"]   # once each: no duplicates after resume
    samples = [a for a in every if "valsample" in a.name]
    assert len(samples) == 1                                     # the sample table is logged once
    models = [a for a in every if a.type == "model"]
    assert {alias for a in models for alias in a.aliases} >= {"best", "latest"}
    meta = json.loads(models[0].metadata)
    assert meta["classes"] == ["circle", "square", "stripes"] and meta["metrics"]["test/acc"] == summary["test/acc"]
    assert glob.glob(str(runs[0] / "files" / "media" / "table" / "val" / "sample_*"))


def test_nothing_goes_to_wandb_when_disabled(tmp_path, shard_dir):
    train(Config.model_validate(tiny_config(tmp_path, shard_dir, epochs=1)))
    assert not (tmp_path / "run" / "wandb").exists()
