"""Checkpoints survive `kill -9` at any moment: only complete ones are ever resumed from."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROCESSES, REPO, tiny_config, write_config
from dtl.checkpoints import STATE_FILE, latest_checkpoint, list_checkpoints, recover_partial

pytestmark = PROCESSES  # multi-process: one such test at a time (conftest)


def _command(config: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "dtl" / "train.py"), "--config", str(config), f"output_dir={out}"]


def _kill_while_writing(cmd: list[str], ckpts: Path, min_step: int, env: dict) -> set[str]:
    """Start the run, SIGKILL it the moment a checkpoint folder is being written; return what was left."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpts) if ckpts.is_dir() else []
            if any(n.startswith(".tmp-ckpt-") and int(n[-8:]) >= min_step for n in names):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return set(os.listdir(ckpts))
            time.sleep(0.0005)
        raise AssertionError(f"no checkpoint write seen (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(400)
def test_kill_9_during_checkpoint_write_then_same_command_resumes_from_last_complete(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir, epochs=3, **{"checkpoint.every_steps": 1, "checkpoint.keep": 2})
    config = write_config(tmp_path / "run.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

    base = tmp_path / "uninterrupted"
    subprocess.run(_command(config, base), env=env, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    for attempt in range(5):  # the rename may win the race with the kill; then try the next write
        left = _kill_while_writing(_command(config, out), ckpts, min_step=4 + 3 * attempt, env=env)
        if any(n.startswith(".tmp-") for n in left):
            break
    else:
        pytest.fail("never killed a run in the middle of a checkpoint write")
    partial = sorted(n for n in left if n.startswith(".tmp-"))
    complete = sorted(n for n in left if n.startswith("ckpt-"))
    assert complete, left
    assert all((ckpts / n / STATE_FILE).is_file() for n in complete)
    assert int(partial[0][-8:]) > int(complete[-1][-8:])  # the newest write is the broken one

    # the same command again: it resumes from the newest complete checkpoint, never the partial one
    r = subprocess.run(_command(config, out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpts / complete[-1]}" in r.stdout + r.stderr
    assert not [n for n in os.listdir(ckpts) if n.startswith((".tmp-", ".old-"))]
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    for k in expected:
        assert torch.equal(final[k], expected[k]), k


def test_recovery_keeps_a_complete_checkpoint_that_was_being_replaced(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("ckpt-00000004", ".old-ckpt-00000006", ".tmp-ckpt-00000007", ".old-ckpt-00000004"):
        (root / name).mkdir(parents=True)
        (root / name / STATE_FILE).write_text("{}")
    recover_partial(root)
    # .old-6 had no replacement in place: it is the newest complete checkpoint again
    assert [p.name for p in list_checkpoints(root)] == ["ckpt-00000004", "ckpt-00000006"]
    assert latest_checkpoint(root).name == "ckpt-00000006"
    assert sorted(os.listdir(root)) == ["ckpt-00000004", "ckpt-00000006"]


def test_best_weights_follow_the_checkpoint_a_resume_continues_from(tmp_path):
    """best.safetensors changes only once a checkpoint records its epoch: weights selected after the
    checkpoint resumed from (killed before the next one) are dropped, those at or before it published;
    a best selected after an older checkpoint that resume=PATH picks is moved aside, not lost."""
    from dtl.checkpoints import (BEST_FILE, BEST_PENDING, export_model, publish_best, read_export_meta,
                                 settle_best)

    def export(name: str, step: int) -> None:
        export_model({"w": torch.full((2,), float(step))}, tmp_path / name,
                     {"backbone": "x", "classes": ["a", "b"], "step": step})

    def best_step() -> int:
        return read_export_meta(tmp_path / BEST_FILE)["step"]

    export(BEST_FILE, 5)
    for pending, resume, published in ((10, 10, True), (12, 10, False), (3, None, False)):
        export(BEST_PENDING, pending)
        before = best_step()
        assert settle_best(tmp_path, resume) is None
        assert best_step() == (pending if published else before) and not (tmp_path / BEST_PENDING).exists()
    assert best_step() == 10
    aside = settle_best(tmp_path, 8)            # resume=PATH to step 8: the best of step 10 is not its state's
    assert aside == tmp_path / "best.step10.safetensors" and aside.is_file() and not (tmp_path / BEST_FILE).exists()
    export(BEST_PENDING, 20)
    publish_best(tmp_path)
    assert best_step() == 20


@pytest.fixture(scope="module")
def val_heavy_shards(tmp_path_factory) -> Path:
    """Half the images in validation: a validation pass long enough to be signalled in."""
    from conftest import write_imagefolder
    from dtl.shard_writer import write_imagefolder as convert

    root = tmp_path_factory.mktemp("val_heavy")
    write_imagefolder(root / "img", per_class=40, size=64)
    convert(root / "img", root / "shards", val_fraction=0.5, test_fraction=0.1, seed=0, maxcount=8)
    return root / "shards"


def _signal_group_when(cmd: list[str], metrics: Path, ready, env: dict) -> tuple[int, str]:
    """Run `cmd` in its own process group and SIGTERM the whole group (what `timeout`, scancel and a
    Slurm time limit do: the DataLoader workers get it too) once `ready(records)` holds."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if ready([json.loads(line) for line in lines if line.endswith("}")]):
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.002)
        else:
            raise AssertionError(f"the run never got to the signal (exit {proc.poll()})")
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def val_heavy_run(tmp_path_factory, val_heavy_shards) -> tuple[Path, Path, int]:
    """The config (every layer trained, two loader workers), its uninterrupted run and its steps per epoch."""
    root = tmp_path_factory.mktemp("val_heavy_run")
    cfg = tiny_config(root, val_heavy_shards, epochs=3,
                      **{"data.num_workers": 2, "data.img_size": 96, "data.batch_size": 4,
                         "finetune.stages": [{"epoch": 0, "train": "all"}]})
    config = write_config(root / "run.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(_command(config, root / "uninterrupted"), env=env, check=True, capture_output=True, timeout=300)
    records = [json.loads(line) for line in (root / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = next(r["step"] for r in records if "epoch_time_s" in r)
    return config, root / "uninterrupted", steps_per_epoch


@pytest.mark.timeout(600)
@pytest.mark.parametrize("phase", ["training", "validation"])
def test_sigterm_to_the_process_group_stops_cleanly_with_loader_workers(tmp_path, val_heavy_run, phase):
    """The workers ignore the signal; the trainer finishes the step (or the validation pass),
    checkpoints and exits 0, and the same command continues to the uninterrupted run's weights."""
    config, base, per_epoch = val_heavy_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / "run"

    def in_training(records: list[dict]) -> bool:  # a step of the second epoch
        return any(r.get("epoch") == 1 and "train/loss_step" in r for r in records)

    def in_validation(records: list[dict]) -> bool:  # the first epoch's last step is logged, its validation not
        return bool(records) and records[-1].get("step") == per_epoch and "train/loss_step" in records[-1]

    for attempt in range(5):  # the poll may lose the race with a short phase; then try a new run
        shutil.rmtree(out, ignore_errors=True)
        rc, text = _signal_group_when(_command(config, out), out / "metrics.jsonl",
                                      in_training if phase == "training" else in_validation, env)
        stopped = re.search(r"stopped (?:in epoch (\d+)/3 after batch \d+/\d+|after epoch (\d+)/3), "
                            r"step (\d+): checkpoint written", text)
        assert rc == 0, text[-3000:]
        assert "received SIGTERM" in text and stopped, text[-3000:]
        assert "Traceback" not in text and "exited unexpectedly" not in text, text[-3000:]
        if stopped.group(1) == "2" if phase == "training" else stopped.group(2) == "1":  # the console's numbers
            break
    else:
        pytest.fail(f"never signalled a run during its {phase}: {stopped.group(0)}")
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and int(ckpts[-1].name[-8:]) == int(stopped.group(3))

    r = subprocess.run(_command(config, out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpts[-1]}" in r.stdout + r.stderr
    final, expected = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    for k in expected:
        assert torch.equal(final[k], expected[k]), k
