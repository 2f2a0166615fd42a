"""Every configs/tutorials/*.yaml trains (one step per stage of its plan) on tiny synthetic shards, so none rots."""
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from dtl.run_config import Config
from dtl.train import train

# its module-scoped fixture is built once: the module's tests stay on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_tutorial_configs")

TUTORIALS = Path(__file__).resolve().parent.parent / "configs" / "tutorials"
SMALL = {"torchvision/inception_v3": 299, "legacy_xception": 71, "torchvision/alexnet": 64}  # smallest inputs they take


@pytest.fixture(scope="module")
def two_class_shards(tmp_path_factory, image_folder):
    from dtl.shard_writer import write_imagefolder

    two = tmp_path_factory.mktemp("two") / "images"
    for c in ("circle", "square"):
        shutil.copytree(image_folder / c, two / c)
    out = tmp_path_factory.mktemp("two_shards")
    write_imagefolder(two, out, val_fraction=0.15, test_fraction=0.2, seed=0, maxcount=8)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(p.stem for p in TUTORIALS.glob("*.yaml")))
def test_tutorial_config_trains_every_stage(tmp_path, shard_dir, two_class_shards, name, monkeypatch):
    cfg = yaml.safe_load((TUTORIALS / f"{name}.yaml").read_text())
    model = cfg["model"]
    binary = model.get("head", {}).get("binary", False)
    stages = cfg.get("finetune", {}).get("stages", [{"epoch": 0, "train": 1}])
    cfg.update(output_dir=str(tmp_path / "run"), epochs=len(stages), max_steps_per_epoch=1, report=False,
               wandb={"enabled": False})
    cfg["finetune"]["stages"] = [{**s, "epoch": i} for i, s in enumerate(stages)]   # one epoch per stage
    cfg["data"].update(root=str(two_class_shards if binary else shard_dir), img_size=SMALL.get(model["backbone"], 32),
                       batch_size=4, num_workers=0)
    model["pretrained"] = False
    monkeypatch.syspath_prepend(str(TUTORIALS))   # mobilenetv3_own_code: `mobilenetv3:mobilenetv3_large`
    result = train(Config.model_validate(cfg))
    assert result.summary["steps"] == len(stages)
    assert 0 <= result.summary["test/acc"] <= 1 and result.summary["test/loss"] == result.summary["test/loss"]
    sys.modules.pop("mobilenetv3", None)
