"""bench/vs_timm.py gives timm's train.py the quickstart's recipe, and refuses what timm cannot do."""
import argparse
import sys
from pathlib import Path

import pytest

# its module-scoped fixture is built once: the module's tests stay on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_bench_vs_timm")

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def vs_timm():
    sys.path.insert(0, str(BENCH))
    try:
        import vs_timm
        yield vs_timm
    finally:
        sys.path.remove(str(BENCH))


def _args(*dtl_set: str) -> argparse.Namespace:
    """The quickstart less its balanced sampling, as the README's earlier pairs ran it (the bench takes it too)."""
    return argparse.Namespace(config="configs/quickstart.yaml", data="no/such/folder", img_size=None,
                              backbone=None, dtl_set=["data.balanced_sampling=0", *dtl_set])


def test_timm_flags_follow_the_quickstart_config(vs_timm):
    cfg = vs_timm.dtl_config(_args())
    flags = vs_timm.timm_args(cfg, vs_timm.backbone_preprocessing(cfg))
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--batch-size"] == "32" and pairs["--workers"] == "2" and pairs["--opt"] == "adamw"
    assert float(pairs["--lr"]) == 1e-3 and float(pairs["--weight-decay"]) == 0.01 and pairs["--sched"] == "cosine"
    assert float(pairs["--smoothing"]) == 0.1 and pairs["--train-interpolation"] == "bicubic"
    assert float(pairs["--hflip"]) == 0.5 and float(pairs["--vflip"]) == 0.5 and float(pairs["--crop-pct"]) == 1.0
    scale = flags[flags.index("--scale") + 1:flags.index("--scale") + 3]
    assert [float(v) for v in scale] == [0.9, 1.0]
    more = vs_timm.timm_args(vs_timm.dtl_config(_args("data.augment.mixup=0.2", "optim.clip_grad_norm=1.0")),
                             vs_timm.backbone_preprocessing(cfg))
    assert more[more.index("--mixup") + 1] == "0.2" and more[more.index("--clip-grad") + 1] == "1.0"


@pytest.mark.parametrize("override, says", [
    ("data.augment.rot90=0.5", "no quarter turns"),
    ("eval.tta=dihedral", "no quarter turns"),
    ("optim.schedule=step", "maps cosine only"),
])
def test_what_timm_cannot_match_is_refused_before_any_run(vs_timm, override, says):
    with pytest.raises(SystemExit, match=says):
        vs_timm.dtl_config(_args(override))


def test_tilted_epochs_are_tested_with_the_prior_correction_dtl_exports(vs_timm, shard_dir, tmp_path):
    """timm trains on the data as it is; dtl's raw checkpoints of balanced or class-weighted epochs get
    the offset its evaluation adds and its exports fold in (dtl/prior_correction.py), none without."""
    import torch

    from dtl.dataset_index import read_index
    from dtl.prior_correction import prior_offset

    args = _args("data.balanced_sampling=0.5")
    args.data = str(shard_dir)
    cfg = vs_timm.dtl_config(args)  # accepted
    counts = read_index(str(shard_dir))["splits"]["train"]["class_counts"]
    assert torch.allclose(torch.tensor(vs_timm.epoch_offset(cfg)), prior_offset(cfg, counts))
    args = _args()
    args.data = str(shard_dir)
    assert vs_timm.epoch_offset(vs_timm.dtl_config(args)) is None
    args = _args("data.class_weights=true", "data.class_weight_power=0.5")  # the same tilt, the same offset
    args.data = str(shard_dir)
    assert torch.allclose(torch.tensor(vs_timm.epoch_offset(vs_timm.dtl_config(args))), prior_offset(cfg, counts))
    from dtl.dataset_index import DataError

    args = _args("data.balanced_sampling=0.5")
    args.data = str(tmp_path)  # no dataset.json: no counts to correct with, said by name
    with pytest.raises(DataError, match=r"dataset.json: no class counts for split 'train'"):
        vs_timm.epoch_offset(vs_timm.dtl_config(args))


def test_size_and_backbone_come_from_the_config_and_a_contradicting_flag_is_refused(vs_timm):
    args = _args("data.img_size=224")
    cfg = vs_timm.dtl_config(args)
    assert args.img_size == cfg.data.img_size == 224 and args.backbone == cfg.model.backbone == "tf_efficientnet_lite0"
    args = _args()
    args.img_size = 128
    with pytest.raises(SystemExit, match="differ from"):
        vs_timm.dtl_config(args)


def test_timm_is_told_the_backbones_normalisation_and_the_datasets_classes(vs_timm, shard_dir):
    from conftest import CLASSES

    args = _args()
    args.data = str(shard_dir)
    pre, n = vs_timm.backbone_inputs(vs_timm.dtl_config(args))
    assert n == len(CLASSES) and pre["input_size"] == [3, args.img_size, args.img_size]
    assert pre["mean"] == pre["std"] == [0.5] * 3 and pre["interpolation"] == "bicubic"  # EfficientNet-Lite's
    args = _args("model.backbone=resnet18.tv_in1k")
    args.data, args.backbone = str(shard_dir), "resnet18.tv_in1k"
    cfg = vs_timm.dtl_config(args)
    pre, _ = vs_timm.backbone_inputs(cfg)
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["crop_pct"] == 1.0  # ImageNet's, the config's crop
    flags = vs_timm.timm_args(cfg, pre)
    assert pre["interpolation"] == "bilinear" == flags[flags.index("--train-interpolation") + 1]  # as dtl trains


def test_the_img_per_s_ratio_counts_only_dtl_epochs_that_train_every_group(vs_timm):
    """A plan that keeps the stem frozen trains faster than a full fine-tune: its epochs must not
    pass for the fully unfrozen step the speed goal is about."""
    def epochs(rates, all_trainable, accs):
        return [{"epoch": i + 1, "t_s": 10.0 * (i + 1), "img_per_s": r, "all_trainable": a, "test_acc": t}
                for i, (r, a, t) in enumerate(zip(rates, all_trainable, accs))]

    timm_run = {"final_test_acc": 0.7, "wall_s": 40.0, "epochs": epochs([10, 10, 10, 10], [True] * 4, [.5, .6, .6, .7])}
    staged = {"wall_s": 45.0, "epochs": epochs([30, 12, 12, 12], [False, True, True, True], [.6, .7, .8, .8])}
    frozen = {"wall_s": 30.0, "epochs": epochs([15, 15, 15, 15], [False] * 4, [.6, .7, .8, .8])}
    pair = vs_timm.pair_summary(staged, timm_run)
    assert pair["img_per_s_ratio"] == pytest.approx(1.2) and pair["plan_img_per_s_ratio"] == pytest.approx(1.2)
    assert pair["dtl_time_to_timm_final_s"] == 20.0 and pair["time_to_accuracy_ratio"] == pytest.approx(0.5)
    pair = vs_timm.pair_summary(frozen, timm_run)
    assert pair["img_per_s_ratio"] is None and pair["plan_img_per_s_ratio"] == pytest.approx(1.5)


def test_every_group_trains_when_an_epoch_trains_the_configs_whole_classifier(vs_timm):
    """`all_trainable` compares an epoch's trainable_params with the classifier dtl builds from the
    config, head options included (an MLP head has more parameters than the plain Linear)."""
    plain = vs_timm.model_params(vs_timm.dtl_config(_args()), 4)
    mlp = vs_timm.model_params(vs_timm.dtl_config(_args("model.head.hidden=[64]", "finetune.probe.enabled=false")), 4)
    assert mlp == plain - (1280 * 4 + 4) + (1280 * 64 + 64) + (64 * 4 + 4)
