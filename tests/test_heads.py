"""MLP and single-logit binary heads: trained, exported, rebuilt from the export, predicted with."""
import shutil
import subprocess
import sys

import torch
from torch import nn

from conftest import tiny_config, write_config
from dtl.checkpoints import load_exported
from dtl.classifier_heads import BinaryLogit
from dtl.run_config import Config
from dtl.train import train


def test_mlp_head_trains_and_rebuilds_from_the_export(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir, epochs=1, report=False,
                      **{"model.head": {"hidden": [16, 8], "activation": "relu", "dropout": 0.2}})
    train(Config.model_validate(cfg))
    model, meta = load_exported(tmp_path / "run" / "model.safetensors")
    assert meta["head"] == {"hidden": [16, 8], "activation": "relu", "dropout": 0.2, "binary": False}
    linears = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears][1:] == [(16, 8), (8, 3)]
    assert any(isinstance(m, nn.Dropout) for m in model.classifier.modules())


def test_binary_head_is_one_sigmoid_logit_trained_with_bce(tmp_path, image_folder):
    from dtl.shard_writer import write_imagefolder

    two = tmp_path / "two"
    for c in ("circle", "square"):
        shutil.copytree(image_folder / c, two / c)
    shards = tmp_path / "shards"
    write_imagefolder(two, shards, val_fraction=0.15, test_fraction=0.2, seed=0, maxcount=8)
    cfg = tiny_config(tmp_path, shards, epochs=2, **{"model.head": {"binary": True}})
    summary = train(Config.model_validate(cfg)).summary
    assert summary["test/samples"] > 0 and 0 <= summary["test/acc"] <= 1
    model, meta = load_exported(tmp_path / "run" / "model.safetensors")
    last = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 1 and isinstance(model.classifier[-1], BinaryLogit)
    # cross-entropy on [0, z] is BCE-with-logits on z, and softmax gives sigmoid(z)
    z = torch.randn(6, 1)
    y = torch.randint(0, 2, (6,))
    two_logits = BinaryLogit()(z)
    assert torch.allclose(nn.functional.cross_entropy(two_logits, y),
                          nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float()))
    assert torch.allclose(two_logits.softmax(1)[:, 1], torch.sigmoid(z[:, 0]))
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "predict", str(tmp_path / "run" / "model.safetensors"),
                        str(two / "circle")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("\n") == 24, r.stderr[-1000:]


def test_binary_head_with_three_classes_is_one_clear_line(tmp_path, shard_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shard_dir, **{"model.head": {"binary": True}}))
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "train", "--config", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "model.head.binary needs exactly 2 classes" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
