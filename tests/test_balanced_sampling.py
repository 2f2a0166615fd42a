"""Balanced sampling: the training stream resampled toward equal classes, exact on resume."""
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from conftest import CLASSES, encode, make_image, tiny_config
from dtl.shard_writer import index_shards

# its module-scoped fixture is built once: the module's tests stay on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_balanced_sampling")

COUNTS = [60, 15, 5]  # 80 training samples, 12:3:1


@pytest.fixture(scope="module")
def skewed_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("skewed")
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    labels = [labels[(7 * i) % len(labels)] for i in range(len(labels))]  # 7 is coprime to 80: a mix
    for s in range(4):
        with wds.TarWriter(str(root / f"train-{s}.tar")) as sink:
            for n in range(s * 20, s * 20 + 20):
                sink.write({"__key__": f"s{n:04d}", "png": encode(make_image(labels[n], n, size=16), "PNG"),
                            "cls": labels[n]})
    index_shards(root, {"train": "train-{0..3}.tar"}, CLASSES)
    return root


def _noise(img) -> torch.Tensor:
    """Stands in for augmentation: a draw from the generator the stream seeds per sample (and copy)."""
    return torch.rand(2)


def _stream(root: Path, power: float):
    from dtl.dataset_index import read_index, split_source
    from dtl.shard_stream import ShardStream, StreamOptions, balanced_repeats

    source = split_source(str(root), "train", read_index(str(root)), {}, {})
    assert source.class_counts == COUNTS
    opts = StreamOptions(classes=CLASSES, train=True, seed=3, shuffle_buffer=50,
                         repeats=balanced_repeats(source.class_counts, power) if power else None)
    return ShardStream(source, _noise, opts)


def test_repeat_factors_give_each_class_its_share():
    from dtl.shard_stream import balanced_repeats

    for power, shares in ((1.0, [1, 1, 1]), (0.5, [c ** 0.5 for c in COUNTS]), (0.0, COUNTS)):
        r = balanced_repeats(COUNTS, power)
        got = [ri * c for ri, c in zip(r, COUNTS)]
        assert sum(got) == pytest.approx(sum(COUNTS))  # the epoch keeps its length
        assert [g / sum(got) for g in got] == pytest.approx([s / sum(shares) for s in shares])
    assert balanced_repeats(COUNTS, 0.0) == pytest.approx([1, 1, 1])


def test_balanced_epochs_keep_their_length_even_out_classes_and_replay_exactly(skewed_shards):
    plain = _stream(skewed_shards, 0.0)
    plain.set_epoch(1)
    assert sorted(k for _, _, k in plain) == [f"s{n:04d}" for n in range(80)]  # off: exactly once

    s = _stream(skewed_shards, 1.0)
    labels = Counter()
    for epoch in range(3):
        s.set_epoch(epoch)
        items = list(s)
        assert len(items) == 80
        labels.update(y for _, y, _ in items)
        copies: dict[str, list[torch.Tensor]] = {}
        for x, _, k in items:
            copies.setdefault(k, []).append(x)
        repeated = [xs for xs in copies.values() if len(xs) > 1]
        assert repeated and all(not torch.equal(xs[0], xs[1]) for xs in repeated)  # each copy its own draw
    assert all(60 <= labels[c] <= 100 for c in range(3)), labels  # 240 draws, 80 each expected (was 180:45:15)

    s.set_epoch(2)
    again = list(s)
    assert [k for *_, k in again] == [k for *_, k in items] and all(torch.equal(a[0], b[0]) for a, b in zip(again, items))
    s.set_epoch(2, skip_batches=5, batch_size=4)  # a resume after 5 batches of 4 delivers the rest, the same
    rest = list(s)
    assert [k for *_, k in rest] == [k for *_, k in items[20:]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, items[20:]))


def test_balanced_sampling_trains_and_refuses_what_it_cannot_do(skewed_shards, tmp_path):
    from dtl.data_pipeline import build_data
    from dtl.dataset_index import DataError
    from dtl.run_config import Config
    from dtl.train import train

    cfg = tiny_config(tmp_path, skewed_shards, epochs=2, **{"data.balanced_sampling": 1.0, "data.img_size": 16,
                                                            "finetune.stages": [{"epoch": 0, "train": "all"}]})
    summary = train(Config.model_validate(cfg)).summary
    assert summary["steps"] == 2 * (80 // 8) and summary["train/images"] == 160

    with pytest.raises(ValueError, match="class_weights and data.balanced_sampling"):
        Config.model_validate({**cfg, "data": {**cfg["data"], "class_weights": True}})
    no_counts = Config.model_validate({**cfg, "data": {
        **cfg["data"], "root": str(tmp_path / "nowhere"), "classes": CLASSES, "samples": {"train": 80},
        "shards": {"train": str(skewed_shards / "train-{0..3}.tar")}}})
    pre = {"input_size": [3, 16, 16], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    with pytest.raises(DataError, match="balanced_sampling needs the 'train' split's class counts"):
        build_data(no_counts, pre, CLASSES, 0, 1, None)


def test_prior_correction_folded_into_the_head_gives_the_logits_plus_the_offset():
    """Bayes' rule back to the data's prior: logits + power * log(count), in the exported bias too."""
    from dtl.backbones import create_classifier, head_name
    from dtl.prior_correction import fold_into_bias, output_bias_key, prior_offset
    from dtl.run_config import Config

    def config(**extra):
        return Config.model_validate({"data": {"root": "x", **extra.pop("data", {})}, "model": {"backbone": "x"}, **extra})

    offset = prior_offset(config(data={"balanced_sampling": 0.5}), COUNTS)
    expected = torch.tensor([0.5 * torch.tensor(float(c)).log() for c in COUNTS])
    assert torch.allclose(offset, expected - expected.mean())
    assert prior_offset(config(data={"balanced_sampling": 0.5}, eval={"prior_correction": False}), COUNTS) is None
    assert prior_offset(config(), COUNTS) is None  # no resampling: nothing to undo
    # class weights ~ count ** -0.5 tilt the prior as sampling at 0.5 does: the same offset
    assert torch.allclose(prior_offset(config(data={"class_weights": True, "class_weight_power": 0.5}), COUNTS), offset)
    x = torch.randn(4, 3, 32, 32)
    for kwargs, n in (({}, 3), ({"head": {"hidden": [16], "binary": True}}, 2)):
        net = create_classifier("test_efficientnet", n, **kwargs).eval()
        off = offset[:n] - offset[:n].mean()
        with torch.no_grad():
            want = net(x) + off
            net.load_state_dict(fold_into_bias(net.state_dict(), output_bias_key(net, head_name(net), n), off))
            got = net(x)
        # the binary head's logits [0, z] are a softmax's up to a constant: compare the differences
        assert torch.allclose(got - got[:, :1], want - want[:, :1], atol=1e-5), kwargs


def test_class_weighted_loss_plus_the_offset_is_the_unweighted_posterior():
    """The Bayes argument for class weights, checked on a problem whose optimum is known: softmax
    regression on a discrete input, fitted to convergence with dtl's class weights, answers
    p(c|x) * w_c; adding `prior_offset` recovers the data's posterior p(c|x)."""
    from dtl.data_pipeline import class_weights
    from dtl.prior_correction import prior_offset
    from dtl.run_config import Config

    g = torch.Generator().manual_seed(0)
    joint = torch.rand(5, 3, generator=g) * torch.tensor([12.0, 3.0, 1.0])  # n(x, c): class 0 common, 2 rare
    counts = joint.sum(0)
    x = torch.eye(5).repeat_interleave(3, 0)
    y = torch.arange(3).repeat(5)
    frequency = joint.flatten() / joint.sum()

    class Source:  # class_weights reads the counts off the stream's source
        class_counts = counts.tolist()

    cfg = Config.model_validate({"data": {"root": "x", "class_weights": True, "class_weight_power": 0.7},
                                 "model": {"backbone": "x"}})
    w = class_weights(type("Stream", (), {"source": Source})(), 3, 0.7)
    net = torch.nn.Linear(5, 3)
    opt = torch.optim.LBFGS(net.parameters(), max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(net(x), y, weight=w, reduction="none") * frequency).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        corrected = (net(torch.eye(5)) + prior_offset(cfg, counts.tolist())).softmax(1)
        weighted = net(torch.eye(5)).softmax(1)
    posterior = joint / joint.sum(1, keepdim=True)
    assert torch.allclose(corrected, posterior, atol=1e-3)
    assert not torch.allclose(weighted, posterior, atol=0.05)  # uncorrected, it answers for the tilted prior


@pytest.fixture(scope="module")
def skewed_splits(tmp_path_factory) -> Path:
    """The 12:3:1 classes in train, val and test."""
    root = tmp_path_factory.mktemp("skewed_splits")
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    for split, start in (("train", 0), ("val", 1), ("test", 2)):
        with wds.TarWriter(str(root / f"{split}-0.tar")) as sink:
            for n in range(start, len(labels), 1 if split == "train" else 3):
                sink.write({"__key__": f"{split}{n:04d}", "png": encode(make_image(labels[n], n, size=16), "PNG"),
                            "cls": labels[n]})
    index_shards(root, {s: f"{s}-0.tar" for s in ("train", "val", "test")}, CLASSES)
    return root


@pytest.mark.parametrize("tilt", [{"data.balanced_sampling": 0.75},
                                  {"data.class_weights": True, "data.class_weight_power": 0.75}],
                         ids=["balanced_sampling", "class_weights"])
def test_a_tilted_run_evaluates_and_exports_under_the_real_prior(skewed_splits, tmp_path, tilt):
    """Same training with and without the correction: the exports differ by exactly the offset in the
    head's output bias, and each run's test metrics (with TTA) are its exported file's under `dtl eval`."""
    import json

    from safetensors.torch import load_file

    from dtl.checkpoints import load_exported
    from dtl.cli import main
    from dtl.prior_correction import prior_offset
    from dtl.run_config import Config
    from dtl.train import train

    base = {**tilt, "data.img_size": 16, "finetune.stages": [{"epoch": 0, "train": "all"}],
            "epochs": 2, "checkpoint.monitor": "val/loss", "eval.tta": "hflip", "finetune.probe.enabled": True}
    runs = {}
    for correct in (True, False):
        cfg = tiny_config(tmp_path / str(correct), skewed_splits, **base, **{"eval.prior_correction": correct})
        runs[correct] = train(Config.model_validate(cfg)).summary, Path(cfg["output_dir"]), cfg
    for correct, (summary, out, _) in runs.items():
        assert main(["eval", str(out / "best.safetensors"), "--data", str(skewed_splits), "--num-workers", "0",
                     "--tta", "hflip", "--out", str(out / "ev")]) == 0  # from the file alone, as a user's `dtl eval`
        ev = json.loads((out / "ev" / "eval.json").read_text())
        assert ev["confusion"] == summary["test/confusion"] and ev["loss"] == pytest.approx(summary["test/loss"])
    (on, out_on, cfg_on), (off, out_off, _) = runs[True], runs[False]
    _, meta = load_exported(out_on / "model.safetensors")
    key = meta["prior_correction"]["bias"]
    assert meta["prior_correction"]["tilt_power"] == 0.75
    shift = load_file(str(out_on / "model.safetensors"))[key] - load_file(str(out_off / "model.safetensors"))[key]
    assert torch.allclose(shift, prior_offset(Config.model_validate(cfg_on), COUNTS), atol=1e-5)
    assert "prior_correction" not in load_exported(out_off / "model.safetensors")[1]
    # the probe trains on the real frequencies (step 0): exported as it is, the same with or without
    probe_on, probe_off = load_file(str(out_on / "probe.safetensors")), load_file(str(out_off / "probe.safetensors"))
    assert "prior_correction" not in load_exported(out_on / "probe.safetensors")[1]
    assert torch.equal(probe_on[key], probe_off[key])
    assert on["test/loss"] != pytest.approx(off["test/loss"])


def test_a_probe_only_run_is_not_corrected(skewed_splits, tmp_path):
    """The probe trains on every row once, unresampled: a run of the probe alone has no prior to undo."""
    from dtl.checkpoints import load_exported
    from dtl.run_config import Config
    from dtl.train import train

    cfg = tiny_config(tmp_path, skewed_splits, epochs=0, **{"data.balanced_sampling": 0.75, "data.img_size": 16,
                                                            "finetune.probe.enabled": True})
    summary = train(Config.model_validate(cfg)).summary
    out = Path(cfg["output_dir"])
    assert summary["best_epoch"] == 0 and summary["test/samples"] > 0
    assert "prior_correction" not in load_exported(out / "model.safetensors")[1]
    assert "prior_correction" not in load_exported(out / "probe.safetensors")[1]


def test_prior_correction_refuses_a_head_without_an_output_bias():
    """The offset lives in the head's output bias: a head without one is named, with the way out."""
    from torch import nn

    from dtl.backbones import create_classifier
    from dtl.run_config import Config, ConfigError
    from dtl.run_setup import _check_prior_head

    cfg = Config.model_validate({"data": {"root": "x", "balanced_sampling": 0.5}, "model": {"backbone": "test_efficientnet"}})
    net = create_classifier("test_efficientnet", 3)
    _check_prior_head(cfg, net, 3)  # the built head has one
    net.classifier = nn.Linear(net.classifier.in_features, 3, bias=False)
    with pytest.raises(ConfigError, match="head has no output Linear with a bias.*eval.prior_correction=false"):
        _check_prior_head(cfg, net, 3)
    _check_prior_head(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"prior_correction": False})}), net, 3)
