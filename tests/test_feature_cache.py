"""Head-only stages on cached backbone features: the same head as the uncached run, faster epochs."""
import json

import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dtl.run_config import Config
from dtl.train import train

HEAD_ONLY = {"finetune.stages": [{"epoch": 0, "train": 1}], "epochs": 3}


def _head(path) -> dict:
    sd = load_file(str(path / "run" / "model.safetensors"))
    return {k: v for k, v in sd.items() if k.startswith("classifier.")}


def test_cached_head_only_epochs_match_the_uncached_run_and_resume(tmp_path, shard_dir):
    """K = head-only epochs: the head sees exactly the uncached run's inputs, also across a stop + resume."""
    uncached = train(Config.model_validate(tiny_config(tmp_path / "u", shard_dir, **HEAD_ONLY,
                                                       **{"finetune.cache_frozen": False})))
    cfg = Config.model_validate(tiny_config(tmp_path / "c", shard_dir, stop_after_steps=7, **HEAD_ONLY,
                                            **{"finetune.cache_views": 3}))
    assert train(cfg).stopped                 # mid epoch 2 (5 steps per epoch)
    cfg.stop_after_steps = None
    cached = train(cfg)
    assert cached.summary["steps"] == uncached.summary["steps"] == 15
    a, b = _head(tmp_path / "u"), _head(tmp_path / "c")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    # validation of the head-only epochs ran on cached features too, with the same numbers
    def val(run):
        rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
        return [(r["val/acc"], r["val/loss"]) for r in rows if "train/acc" in r]
    for (acc_u, loss_u), (acc_c, loss_c) in zip(val(tmp_path / "u"), val(tmp_path / "c")):
        assert acc_u == acc_c and abs(loss_u - loss_c) < 1e-5
    views = sorted(p.name for p in (tmp_path / "c" / "run" / "feature_cache").rglob("view*.pt"))
    assert views == ["view0.pt", "view1.pt", "view2.pt"]


def test_fewer_views_than_epochs_reuse_the_cache(tmp_path, shard_dir):
    """K = 1: epoch 1 fills the cache, epochs 2 and 3 read it (keys only, no decode) and train the head."""
    train(Config.model_validate(tiny_config(tmp_path, shard_dir, **HEAD_ONLY, **{"finetune.cache_views": 1})))
    out = tmp_path / "run"
    saved = torch.load(next((out / "feature_cache").rglob("view0.pt")), weights_only=True)
    assert 40 <= len(saved["keys"]) <= 45 and saved["x"].shape[0] == len(saved["keys"])  # whole batches of 8
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "train/acc" in r]
    assert len(epochs) == 3
    # training went on after the fill: the head moved between epoch 2 and 3 on cached features
    assert epochs[1]["train/loss"] != epochs[2]["train/loss"]


def test_a_head_only_stage_after_an_unfreeze_runs_the_trained_backbone(tmp_path, shard_dir):
    """Head only, all, head only: epoch 3's features come from the backbone epoch 2 trained, so the
    cached run (epoch 1 cached only) ends with the uncached run's weights, not a head fit to stale features."""
    plan = {"finetune.stages": [{"epoch": 0, "train": 1}, {"epoch": 1, "train": "all"}, {"epoch": 2, "train": 1}],
            "finetune.cache_views": 3}
    train(Config.model_validate(tiny_config(tmp_path / "u", shard_dir, **plan, **{"finetune.cache_frozen": False})))
    train(Config.model_validate(tiny_config(tmp_path / "c", shard_dir, **plan)))
    a = load_file(str(tmp_path / "u" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "c" / "run" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    views = sorted(p.name for p in (tmp_path / "c" / "run" / "feature_cache").rglob("view*.pt"))
    assert views == ["view0.pt"]  # one leading head-only epoch: K is 1, not 3


def test_the_cache_identity_follows_how_the_backbone_is_built(tmp_path, shard_dir):
    """A rerun in the same output_dir that builds the backbone differently gets its own feature files."""
    from contextlib import closing

    from dtl.linear_probe import cache_identity
    from dtl.run_setup import build_run

    run = build_run(Config.model_validate(tiny_config(tmp_path, shard_dir)), ())
    with closing(run.data):
        before = cache_identity(run)
        assert cache_identity(run) == before  # stable for the same run
        for key, value in (("head_module", "classifier"), ("weights_map", "positional"),
                           ("factory_kwargs", {"width": 2})):
            cfg = run.cfg
            run.cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={key: value})})
            assert cache_identity(run) != before, key
            run.cfg = cfg


def test_no_cache_where_the_frozen_backbone_is_not_a_fixed_function(tmp_path, shard_dir):
    """Stochastic depth stays on in frozen blocks (train mode), so features differ every epoch: such a
    run trains uncached; timm's pre-head dropout (`drop_rate`) is applied to the cached features."""
    from dtl.feature_cache import _backbone_is_a_fixed_function
    from dtl.run_setup import build_run
    from contextlib import closing

    for extra, exact in (({"model.drop_path_rate": 0.2}, False), ({"model.drop_rate": 0.2}, True),
                         ({"finetune.bn_frozen": False}, False), ({}, True)):
        run = build_run(Config.model_validate(tiny_config(tmp_path / str(len(extra)) / str(exact), shard_dir,
                                                          **HEAD_ONLY, **extra)), ())
        with closing(run.data):
            assert _backbone_is_a_fixed_function(run) == exact, extra
            assert (run.features is not None) == exact, extra
