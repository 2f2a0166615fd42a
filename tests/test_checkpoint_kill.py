"""Checkpoints survive `kill -9` at any moment: only complete ones are ever resumed from."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config, write_config
from dtl.checkpoints import STATE_FILE, latest_checkpoint, list_checkpoints, recover_partial


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
