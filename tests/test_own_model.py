"""Your own model code and weights: `module:function`, a head named in the config, keys mapped and reported."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_config, write_config

MODULE = textwrap.dedent("""
    import torch.nn as nn

    class MyNet(nn.Module):  # a third-party definition: MobileNetV3-style classifier block
        def __init__(self, width=8, num_classes=1000):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                          nn.Conv2d(width, 12, 3, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Sequential(nn.Linear(12, 16), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(16, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x))

    def mynet(**kwargs):
        return MyNet(**kwargs)
""")


@pytest.fixture()
def own_model(tmp_path):
    (tmp_path / "mycode").mkdir()
    (tmp_path / "mycode" / "mynet_factory.py").write_text(MODULE)
    sys.path.insert(0, str(tmp_path / "mycode"))
    import mynet_factory

    torch.manual_seed(3)
    net = mynet_factory.mynet(width=8)
    # the published file uses other names: body.* for features.*, fc.* for classifier.*, and an extra tensor
    sd = {k.replace("features.", "body.").replace("classifier.", "fc."): v for k, v in net.state_dict().items()}
    sd["ema_decay"] = torch.tensor(0.999)
    torch.save({"state_dict": sd}, tmp_path / "mynet.pth")
    yield net
    sys.path.remove(str(tmp_path / "mycode"))
    sys.modules.pop("mynet_factory", None)


def _config(tmp_path, shard_dir, weights_map):
    return tiny_config(tmp_path, shard_dir, epochs=1, report=False, **{
        "model": {"backbone": "mynet_factory:mynet", "pretrained": str(tmp_path / "mynet.pth"),
                  "head_module": "classifier", "factory_kwargs": {"width": 8}, "weights_map": weights_map,
                  "head": {"hidden": [32], "activation": "hardswish", "dropout": 0.2}},
        "finetune.stages": [{"epoch": 0, "train": 1}]})


@pytest.mark.parametrize("weights_map", [[["^body\\.", "features."], ["^fc\\.", "classifier."]], "positional"])
def test_own_code_and_weights_load_through_a_key_map_with_a_report(tmp_path, shard_dir, own_model, weights_map):
    from dtl.checkpoints import load_exported
    from dtl.run_config import Config
    from dtl.train import train

    train(Config.model_validate(_config(tmp_path, shard_dir, weights_map)))
    report = json.loads((tmp_path / "run" / "weights_report.json").read_text())
    # 2 convs (weight, bias) + BatchNorm (weight, bias, 2 running stats; its step count only by name)
    assert report["loaded"] == (9 if isinstance(weights_map, list) else 8)
    assert set(report["not_loaded_head"]) == {"classifier.0.weight", "classifier.0.bias",
                                              "classifier.3.weight", "classifier.3.bias"}
    assert "ema_decay" in report["unused_in_file"] and len(report["unused_in_file"]) == 5  # the old head + extra
    # head-only training: the backbone still holds the file's weights; the new head is Linear-Hardswish-Dropout-Linear
    model, meta = load_exported(tmp_path / "run" / "model.safetensors")
    assert torch.equal(model.features[0].weight, own_model.features[0].weight)
    assert [type(m).__name__ for m in model.classifier] == ["Linear", "Hardswish", "Dropout", "Linear"]
    assert model.classifier[0].in_features == 12 and model.classifier[-1].out_features == 3
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "mycode")}
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "predict", str(tmp_path / "run" / "model.safetensors"),
                        str(shard_dir)], capture_output=True, text=True, env=env)
    assert r.returncode in (0, 2), r.stderr[-1500:]


def test_a_map_that_leaves_model_tensors_empty_is_one_clear_line(tmp_path, shard_dir, own_model):
    cfg = _config(tmp_path, shard_dir, [["^fc\\.", "classifier."]])   # body.* never reaches features.*
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "mycode")}
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "train", "--config", str(path)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "model tensors without weights" in r.stderr and "features.0.weight" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_import_path_without_head_module_is_one_clear_line(tmp_path, shard_dir, own_model):
    cfg = _config(tmp_path, shard_dir, None)
    del cfg["model"]["head_module"]
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "mycode")}
    r = subprocess.run([sys.executable, "-m", "dtl.cli", "train", "--config", str(path)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "model.head_module is needed" in r.stderr and "'classifier'" in r.stderr
