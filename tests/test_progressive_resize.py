"""Progressive resizing: the size schedule, the loader's images at each epoch's size, and a
stopped-and-resumed run that ends bitwise where an uninterrupted one does."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CLASSES, tiny_config
from dtl.data_pipeline import build_data, train_size_at
from dtl.run_config import Config, ConfigError, ProgressiveResizeConfig


def test_sizes_ramp_from_start_to_the_input_size_in_multiples():
    ramp = ProgressiveResizeConfig(start_size=128, end_epoch=8)
    # FFCV's ResolutionScheduler for 128 -> 192 over epochs 0..8: interp, then round to a multiple of 32
    assert [train_size_at(e, 192, ramp) for e in range(10)] == [128, 128, 128, 160, 160, 160, 192, 192, 192, 192]
    later = ProgressiveResizeConfig(start_size=96, start_epoch=2, end_epoch=4, multiple=16)
    assert [train_size_at(e, 160, later) for e in range(6)] == [96, 96, 96, 128, 160, 160]
    assert [train_size_at(e, 160, None) for e in range(3)] == [160, 160, 160]
    ten = lambda start: ProgressiveResizeConfig(start_size=start, end_epoch=10)
    assert train_size_at(9, 120, ten(64)) == 120 and train_size_at(1, 160, ten(100)) == 100  # 128, 96: kept within
    with pytest.raises(ValueError, match="end_epoch .* must come after start_epoch"):
        ProgressiveResizeConfig(start_size=64, start_epoch=3, end_epoch=3)


def test_each_epoch_loads_images_at_its_size(shard_dir, tmp_path):
    cfg = Config.model_validate(tiny_config(tmp_path, shard_dir, **{
        "data.num_workers": 2, "data.progressive_resize": {"start_size": 16, "end_epoch": 2, "multiple": 8}}))
    pre = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    data = build_data(cfg, pre, CLASSES, 0, 1, None)
    for epoch, size in enumerate([16, 24, 32, 32]):
        assert data.resize_train(epoch) == size
        data.train.set_epoch(epoch)
        shapes = {tuple(b["image"].shape[-2:]) for b in data.loader(data.train)}
        assert shapes == {(size, size)}, (epoch, shapes)
    assert {tuple(b["image"].shape[-2:]) for b in data.loader(data.val)} == {(32, 32)}  # validation: the input size
    too_big = Config.model_validate(tiny_config(tmp_path, shard_dir, **{
        "data.progressive_resize": {"start_size": 48, "end_epoch": 2}}))
    with pytest.raises(ConfigError, match="start_size=48 is larger than the input size 32"):
        build_data(too_big, pre, CLASSES, 0, 1, None)


def test_a_resumed_run_keeps_each_epochs_size_and_ends_where_an_uninterrupted_one_does(tmp_path, shard_dir, capsys):
    from dtl.train import train

    extra = {"data.num_workers": 2, "data.progressive_resize": {"start_size": 16, "end_epoch": 2, "multiple": 8}}
    full = tiny_config(tmp_path / "a", shard_dir, **extra)
    train(Config.model_validate(full))
    console = capsys.readouterr().out
    assert "training sizes epoch 1: 16, epoch 2: 24, epoch 3: 32" in console and "img/s at 24 px" in console
    cfg = tiny_config(tmp_path / "b", shard_dir, stop_after_steps=6, **extra)  # mid-epoch 1, at 24 px
    assert train(Config.model_validate(cfg)).stopped
    cfg.update(stop_after_steps=None, resume="auto")
    train(Config.model_validate(cfg))
    assert not list(Path(cfg["output_dir"]).glob("feature_cache/frozen-*"))  # head-only epoch 0 ran uncached, at 16 px
    sizes = lambda out: [r["train/img_size"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
                         if "train/acc" in r]
    assert sizes(full["output_dir"]) == sizes(cfg["output_dir"]) == [16, 24, 32]
    a, b = (load_file(str(Path(c["output_dir"]) / "model.safetensors")) for c in (full, cfg))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_ramp_the_model_or_the_epochs_cannot_take_is_refused_before_anything_is_written(tmp_path, shard_dir):
    from dtl.train import train

    ramp = {"start_size": 16, "end_epoch": 2, "multiple": 8}
    vit = tiny_config(tmp_path, shard_dir, **{"model.backbone": "test_vit", "data.progressive_resize": ramp})
    with pytest.raises(ConfigError, match=r"test_vit fails on a blank (16x16|24x24) image .* every training size must be one the backbone takes"):
        train(Config.model_validate(vit))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="end_epoch=3 must be below epochs=3"):
        Config.model_validate(tiny_config(tmp_path, shard_dir, **{"data.progressive_resize": {**ramp, "end_epoch": 3}}))


def test_a_compiled_model_gets_one_static_graph_per_training_size(tmp_path, shard_dir):
    """model.compile with a ramp: Dynamo compiles each size as its own static graph (left alone, it
    would make height and width symbolic at the second size, for the full-size epochs too), within
    the recompile budget, and learns what eager learns."""
    import logging

    import torch._dynamo
    from torch._dynamo import register_backend
    from torch._dynamo.utils import counters

    from dtl.train import train

    graphs: list[bool] = []  # per graph compiled: does it take symbolic sizes?

    @register_backend(name="dtl_test_shape_recorder")
    def recorder(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and
                                                          any(isinstance(d, torch.SymInt) for d in x.shape))
                          for x in example_inputs))
        return gm.forward

    warned: list[str] = []  # torch's loggers do not propagate to pytest's caplog
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("torch._dynamo.convert_frame").addHandler(handler)
    extra = {"data.progressive_resize": {"start_size": 16, "end_epoch": 2, "multiple": 8},
             "finetune.stages": [{"epoch": 0, "train": "all"}], "model.compile_backend": "dtl_test_shape_recorder"}
    try:
        eager = train(Config.model_validate(tiny_config(tmp_path / "eager", shard_dir, **extra))).summary
        compiled = train(Config.model_validate(tiny_config(tmp_path / "compiled", shard_dir, **extra,
                                                           **{"model.compile": True}))).summary
    finally:  # leave no compiled code or counts to later tests
        logging.getLogger("torch._dynamo.convert_frame").removeHandler(handler)
        torch._dynamo.reset()
        counters.clear()
    assert len(graphs) >= 4 and not any(graphs), graphs  # 16, 24, 32 px training + evaluation, all static
    assert not [m for m in warned if "recompile_limit" in m]
    assert compiled["test/acc"] == pytest.approx(eager["test/acc"], abs=0.05)


def test_a_check_across_keys_reads_as_one_line_naming_them():
    """Cross-key checks (a Config validator) print their message, not pydantic's dump of the config."""
    from dtl.run_config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml",
                    ["data.progressive_resize.start_size=128", "data.progressive_resize.end_epoch=20"])
    assert str(e.value) == (
        f"invalid config ({Path(__file__).parents[1] / 'configs' / 'quickstart.yaml'}): "
        "data.progressive_resize.end_epoch=20 must be below epochs=10 (0-based): training would never reach "
        "data.img_size, the size it is validated and tested at")
