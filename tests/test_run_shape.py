"""The shape of a run (docs/architecture.md): a short loop, the event seam, one error base,
whole-run accounting across resumes, one result type."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_config, write_config
from dtl.run_config import Config
from dtl.run_events import Observer
from dtl.train import train


def test_no_function_in_dtl_is_longer_than_80_lines_and_train_reads_in_one_screen():
    long = []
    for path in sorted((REPO / "dtl").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
                if path.name == "train.py" and node.name == "train":
                    assert n <= 45, n
    assert not long, long


def test_no_module_shadows_a_stdlib_or_installed_top_level_module():
    import importlib.util

    for path in (REPO / "dtl").glob("*.py"):
        name = path.stem
        if name == "__init__":
            continue
        assert name not in sys.stdlib_module_names, name
        spec = importlib.util.find_spec(name)
        assert spec is None or Path(spec.origin or "").parent == REPO / "dtl", f"dtl/{name}.py shadows {spec.origin}"


def test_nothing_in_the_repository_refers_to_files_outside_it():
    # hidden folders are not the repository's: .git, and a virtual environment made in the checkout
    # (`python -m venv .venv`), whose site-packages hold files that are not even UTF-8
    files = [p for p in REPO.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
             p.relative_to(REPO).parts[:-1]) and p.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch", ".toml")
             and "results" not in p.parts]
    hits = [str(p.relative_to(REPO)) for p in files if re.search(r"DESIGN\.md|\.\./shared", p.read_text())]
    assert not hits, hits


class Recorder(Observer):
    def __init__(self):
        self.events = []

    def run_start(self, run):
        self.events.append(("run_start",))

    def stage_start(self, run, stage, n):
        self.events.append(("stage_start", stage.index))

    def eval_end(self, run, split, result):
        assert len(result.keys) == result.metrics["samples"] == len(result.labels) == len(result.probs)
        assert result.probs.shape[1] == 3 and result.confusion.sum() == result.metrics["samples"]
        self.events.append(("eval_end", split))

    def epoch_end(self, run, record):
        self.events.append(("epoch_end", run.state.epoch))

    def fit_end(self, run, result):
        self.events.append(("fit_end", result.status))


def test_events_in_order_and_validation_runs_once_per_epoch(tmp_path, shard_dir):
    rec = Recorder()
    result = train(Config.model_validate(tiny_config(tmp_path, shard_dir)), observers=[rec])
    assert rec.events[:9] == [("run_start",), ("eval_end", "val"), ("epoch_end", 0),
                              ("stage_start", 1), ("eval_end", "val"), ("epoch_end", 1),
                              ("stage_start", 2), ("eval_end", "val"), ("epoch_end", 2)]
    # the final weights are tested, and the selected ones too when an earlier epoch was best
    tests = ([("eval_end", "test")] if result.summary["best_epoch"] == 3 else
             [("eval_end", "test_final"), ("eval_end", "test")])
    assert rec.events[9:] == [*tests, ("fit_end", "finished")]
    assert result.status == "finished" and result.summary["test/samples"] == 15


def test_stopped_and_resumed_run_counts_the_whole_run(tmp_path, shard_dir):
    from dtl.checkpoints import latest_checkpoint, read_train_state

    full = train(Config.model_validate(tiny_config(tmp_path / "a", shard_dir)))
    cfg = tiny_config(tmp_path / "b", shard_dir, stop_after_steps=7, report=True)  # the report reads its history back
    stopped = train(Config.model_validate(cfg))
    assert type(stopped) is type(full) and stopped.status == "stopped" and stopped.steps == 7
    before = read_train_state(latest_checkpoint(tmp_path / "b" / "run" / "checkpoints"))
    assert before.images_seen == 7 * 8 and before.wall_time_s > 0
    cfg.update(stop_after_steps=10)  # stops again after the epoch's last batch, before its validation
    assert train(Config.model_validate(cfg)).steps == 10
    cfg.update(stop_after_steps=None)
    resumed = train(Config.model_validate(cfg))
    # 40 of 45 samples per epoch (whole batches of 8), 3 epochs: the whole run, not since the restart
    assert resumed.summary["train/images"] == full.summary["train/images"] == 3 * 40
    assert resumed.summary["wall_time_s"] > before.wall_time_s
    # the epoch cut twice reports its whole training (it read "train loss 0.0000 acc 0.000 | 0.0 img/s")
    epochs = {name: [r for r in map(json.loads, (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines())
                     if "train/loss" in r] for name in ("a", "b")}
    assert [r["epoch"] for r in epochs["b"]] == [r["epoch"] for r in epochs["a"]] == [1, 2, 3]
    assert (tmp_path / "b" / "run" / "report" / "curves.png").stat().st_size > 15_000
    for ours, theirs in zip(epochs["b"], epochs["a"]):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-9)
        assert ours["train/acc"] == theirs["train/acc"] and ours["train/img_per_s"] > 0
        assert {k: v for k, v in ours.items() if k.startswith("lr/")} == {k: v for k, v in theirs.items() if k.startswith("lr/")}


def _main(tmp_path, cfg: dict, *overrides: str) -> subprocess.CompletedProcess:
    path = write_config(tmp_path / "c.yaml", cfg)
    return subprocess.run([sys.executable, str(REPO / "dtl" / "train.py"), "--config", str(path), *overrides],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  warnings.warn")]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("dtl: error: "), r.stderr[-3000:]
    return lines[-1]


def test_wrong_length_group_lrs_is_one_line_exit_2(tmp_path, shard_dir):
    line = _one_error_line(_main(tmp_path, tiny_config(tmp_path, shard_dir), "finetune.group_lrs=[0.1,0.2]"))
    assert "finetune.group_lrs has 2 values" in line


def test_prepare_imagefolder_with_a_missing_folder_is_one_line_exit_2(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir, **{"data.root": str(tmp_path / "new"), "data.prepare": "imagefolder",
                                              "data.source": str(tmp_path / "nowhere")})
    assert "image folder not found" in _one_error_line(_main(tmp_path, cfg))


def test_an_error_inside_a_dataloader_worker_is_one_line_naming_shard_and_sample(tmp_path, shard_dir):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(shard_dir, root)
    (root / "train-000000.tar").write_bytes((root / "train-000000.tar").read_bytes()[:3000])
    cfg = tiny_config(tmp_path, root, **{"data.num_workers": 2})
    line = _one_error_line(_main(tmp_path, cfg))
    assert "train-000000.tar" in line and "Caught" not in line and "worker" not in line


def test_every_user_error_class_derives_from_dtl_error():
    from dtl.backbones import BackboneError
    from dtl.checkpoints import CheckpointError
    from dtl.cluster_launch import LaunchError
    from dtl.dataset_index import DataError
    from dtl.layer_groups import GroupingError
    from dtl.run_config import ConfigError
    from dtl.user_errors import DtlError

    for cls in (BackboneError, CheckpointError, LaunchError, DataError, GroupingError, ConfigError):
        assert issubclass(cls, DtlError), cls


def test_dataset_index_is_written_and_read_in_one_place():
    offenders = []
    for path in (REPO / "dtl").glob("*.py"):
        if path.name == "dataset_index.py":
            continue
        text = path.read_text()
        if re.search(r"open\([^)]*dataset\.json|\"dataset\.json\"\)|INDEX_NAME\)\.write", text):
            offenders.append(path.name)
    assert not offenders, offenders
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert cfg["data"]["prepare"] == "elpv"
