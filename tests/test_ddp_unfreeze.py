"""Layer-wise unfreezing under real DDP: 2 gloo processes started by torchrun (MULTI_CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PROCESSES, tiny_config, write_config
from dtl.backbones import create_classifier

pytestmark = PROCESSES  # multi-process: one such test at a time (conftest)

HERE = Path(__file__).parent


def _torchrun(tmp_path: Path, shard_dir: Path, rewrap: bool) -> list[dict]:
    weights = tmp_path / "pretrained.pth"
    torch.manual_seed(1)
    torch.save(create_classifier("test_efficientnet", 1000).state_dict(), weights)
    cfg = tiny_config(tmp_path, shard_dir, epochs=3, **{
        "model.pretrained": str(weights), "finetune.ddp_rewrap": rewrap, "data.num_workers": 1,
        "finetune.join_warmup_epochs": 0.0, "data.batch_size": 4})
    path = write_config(tmp_path / "ddp.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000 + (0 if rewrap else 1)),
                        str(HERE / "ddp_stages.py"), str(path), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.timeout(400)
def test_stage_changes_rebuild_ddp_and_keep_ranks_bitwise_equal(tmp_path, shard_dir):
    ranks = _torchrun(tmp_path, shard_dir, rewrap=True)
    report = ranks[0]["report"]
    assert [r["stage"] for r in report] == [0, 1, 2]
    for r in report:
        assert r["wrapped"], "not a real DDP run"
        assert r["equal_across_ranks"], r
        assert r["bn_buffers_equal_across_ranks"], r  # averaged before evaluation and checkpoint
        assert r["frozen_equal_pretrained"], r
        assert r["ddp_params"] == r["trainable"]      # the wrapper covers exactly the trainable params
        assert r["models_tracked"] == 1               # the old wrapper is gone from accelerate's books
    assert report[0]["trainable"] < report[1]["trainable"] < report[2]["trainable"]
    assert ranks[0]["summary"]["test/acc"] == ranks[1]["summary"]["test/acc"]
    assert ranks[0]["summary"]["test/samples"] == 15  # each test sample once across both ranks
    # the 2-rank test metric equals a 1-process evaluation of the same exported weights
    assert _single_process_test_acc(tmp_path / "run" / "model.safetensors", shard_dir) == \
        pytest.approx(ranks[0]["summary"]["test/acc"])


def _single_process_test_acc(weights: Path, shard_dir: Path) -> float:
    from dtl.checkpoints import load_exported
    from dtl.data_pipeline import build_transform
    from dtl.run_config import AugmentConfig
    from dtl.shard_stream import ShardStream, StreamOptions, make_loader, read_index, split_source

    model, meta = load_exported(weights)
    index = read_index(str(shard_dir))
    stream = ShardStream(split_source(str(shard_dir), "test", index, {}, {}),
                         build_transform(meta["preprocessing"], False, AugmentConfig()),
                         StreamOptions(classes=meta["classes"]))
    correct = total = 0
    with torch.no_grad():
        for batch in make_loader(stream, 4, 0):
            correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert total == 15
    return correct / total


@pytest.mark.timeout(400)
def test_the_naive_path_is_caught(tmp_path, shard_dir):
    """Flipping requires_grad after prepare (no re-wrap): the new parameters are never all-reduced."""
    report = _torchrun(tmp_path, shard_dir, rewrap=False)[0]["report"]
    assert report[0]["equal_across_ranks"]           # head-only stage: DDP built for it, fine
    assert not report[1]["equal_across_ranks"]       # silently diverged after the first unfreeze
    assert report[1]["max_abs_diff"] > 0


@pytest.mark.timeout(400)
def test_two_ranks_stopped_mid_epoch_resume_to_the_uninterrupted_run(tmp_path, shard_dir):
    """Stopped inside an epoch with loader workers on both ranks, the same command continues to the
    uninterrupted run's weights, and the cut epoch reports its whole training on both ranks' samples."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    port = 29300 + os.getpid() % 150

    def torchrun(name: str, *overrides: str) -> str:
        cfg = tiny_config(tmp_path / name, shard_dir, epochs=1, **{
            "data.num_workers": 1, "data.batch_size": 4, "finetune.stages": [{"epoch": 0, "train": "all"}]})
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(port), "-m", "dtl.train", "--config", str(path), *overrides],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    torchrun("whole")
    assert "stopped in epoch 1/1 after batch 2/5, step 2" in torchrun("cut", "stop_after_steps=2")
    assert "resumed from" in torchrun("cut")
    ours, theirs = (load_file(str(tmp_path / n / "run" / "model.safetensors")) for n in ("cut", "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    epochs = [[r for r in map(json.loads, (tmp_path / n / "run" / "metrics.jsonl").read_text().splitlines())
               if "train/loss" in r] for n in ("cut", "whole")]
    assert [r["epoch"] for r in epochs[0]] == [r["epoch"] for r in epochs[1]] == [1]
    assert epochs[0][0]["train/loss"] == pytest.approx(epochs[1][0]["train/loss"], rel=1e-9)
    assert epochs[0][0]["train/acc"] == epochs[1][0]["train/acc"]
