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


def test_the_commands_in_the_configs_headers_parse():
    """The `dtl shards ...` / `dtl compare ...` / `accelerate launch dtl/train.py ...` lines a config's
    header tells users to run: their flags exist and their config keys validate (they once had
    --val-fraction, and keys without --set)."""
    import re
    import shlex

    from dtl.cli import build_parser
    from dtl.run_config import load_config

    repo = TUTORIALS.parent.parent
    shown = re.compile(r"^#\s{2,}(dtl (shards|compare|lr-find|eval|predict|groups|config) .*?)(\s{2,}#.*)?$")
    commands = [(path, m.group(1)) for path in sorted(repo.glob("configs/**/*.yaml"))
                for m in map(shown.match, path.read_text().splitlines()) if m]
    assert len(commands) >= 8
    for path, command in commands:
        try:
            args = build_parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"{path.name}: `{command}` does not parse")
        if args.command == "compare":
            load_config(repo / args.config, args.set or [])
    launched = re.compile(r"^#\s{2,}accelerate launch .*dtl/train\.py (.*?)(\s{2,}#.*)?$")
    trains = [(path, shlex.split(m.group(1))) for path in sorted(repo.glob("configs/**/*.yaml"))
              for m in map(launched.match, path.read_text().splitlines()) if m and not m.group(1).endswith("\\")]
    assert len(trains) >= 5
    for path, args in trains:  # the overrides a header shows validate against its config
        config = args[args.index("--config") + 1]
        load_config(repo / config, [a for a in args if "=" in a and not a.startswith("-")])
