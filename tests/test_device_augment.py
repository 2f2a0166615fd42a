"""data.augment_on=device: workers draw each crop, the device decodes, crops, resizes and flips.
The same seed gives the same boxes and flips as timm's CPU transforms (pixels differ only by the
resampling), bad inputs are named, and a run trains with it."""
import json

import pytest
import torch

from conftest import tiny_config
from dtl.data_pipeline import DeviceNormalize, build_transform
from dtl.dataset_index import read_index, split_source
from dtl.device_augment import JPEG, KIND, RAW, CropDraw, DeviceAugment
from dtl.run_config import AugmentConfig, Config, ConfigError
from dtl.shard_stream import ShardStream, StreamOptions, _collate
from dtl.train import train

AUG = AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, crop_scale=(0.3, 1.0))
PRE = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0}


def _items(shard_dir, transform) -> list:
    index = read_index(str(shard_dir))
    source = split_source(str(shard_dir), "train", index, {}, {})
    opts = StreamOptions(classes=index["classes"], train=True, seed=3, shuffle_buffer=16, draft_size=32)
    return list(ShardStream(source, transform, opts))


def _per_image_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image, in grey levels of 255."""
    return ((a - b).abs() * PRE["std"][0] * 255).flatten(1).mean(1)


@pytest.mark.parametrize("decode_on_device", [False, True], ids=["decoded_in_workers", "jpeg_bytes"])
def test_the_device_path_draws_the_cpu_paths_crops_and_flips(shard_dir, decode_on_device):
    cpu = _items(shard_dir, build_transform(PRE, True, AUG, uint8=True))
    dev = _items(shard_dir, CropDraw(32, AUG.crop_scale, AUG.crop_ratio, AUG.hflip, AUG.vflip, AUG.rot90,
                                     decode_on_device))
    assert [k for _, _, k in cpu] == [k for _, _, k in dev] and len(cpu) > 40
    assert [y for _, y, _ in cpu] == [y for _, y, _ in dev]
    encoded = _collate(dev)["image"]
    kinds = encoded.meta[:, KIND].tolist()
    # the fixture holds PNGs and JPEGs: JPEGs travel as bytes only when the device decodes them
    assert (JPEG in kinds) == decode_on_device and RAW in kinds
    a = DeviceNormalize(PRE["mean"], PRE["std"])(_collate(cpu)["image"])
    b = DeviceAugment(PRE["mean"], PRE["std"]).finish(encoded, torch.device("cpu"), channels_last=False)
    assert a.shape == b.shape == (len(cpu), 3, 32, 32)
    err = _per_image_error(a, b)
    # PIL's bilinear resize vs roi_align: under 1 grey level on average, every image under 2.5;
    # a wrong flip or box costs every one of them 4.9 or more (checked below)
    assert err.mean() < 1.0 and err.max() < 2.5, err
    assert _per_image_error(a, b.flip(3)).min() > 4.0


def test_the_device_path_refuses_cpu_only_augmentations_and_a_lone_device_decode(tmp_path, shard_dir):
    cfg = tiny_config(tmp_path, shard_dir, **{"data.augment_on": "device", "data.augment.color_jitter": 0.4})
    with pytest.raises((ConfigError, ValueError), match="data.augment.color_jitter need"):
        Config.model_validate(cfg)
    cfg = tiny_config(tmp_path, shard_dir, **{"data.decode_on": "device"})
    with pytest.raises((ConfigError, ValueError), match="data.decode_on=device needs data.augment_on=device"):
        Config.model_validate(cfg)


def test_which_jpegs_travel_as_bytes_and_which_the_worker_decodes():
    """Bytes: a whole JPEG the draft would not shrink. In the worker: a JPEG cut short (PIL names it,
    for on_error), one with data after its end (a motion photo: valid, decoded there), and one at
    least twice the training size (decoded at the draft's scale, as the CPU path does)."""
    from conftest import encode, make_image
    from dtl.device_augment import open_image

    data = encode(make_image(0, seed=1, size=40))
    assert open_image({"jpg": data}, decode_on_device=True, draft_size=32).kind == JPEG
    assert open_image({"jpg": data}, decode_on_device=False, draft_size=32).kind == RAW
    with pytest.raises(OSError, match="truncated"):
        open_image({"jpg": data[:-50]}, decode_on_device=True, draft_size=32)  # header intact, scan cut short
    trailer = open_image({"jpg": data + b"ftypmp42" + bytes(64)}, decode_on_device=True, draft_size=32)
    assert trailer.kind == RAW and trailer.size == (40, 40)
    big = open_image({"jpg": encode(make_image(0, seed=1, size=96))}, decode_on_device=True, draft_size=32)
    assert big.kind == RAW and big.size == (48, 48) and big.payload.shape == (48, 48, 3)  # draft: half scale


def test_a_run_trains_with_device_augmentation_and_the_frozen_stage_cache(tmp_path, shard_dir):
    """Two workers, JPEGs decoded by the device (the CPU here), a cached head-only stage whose views
    come through the same device path, then all layers; the run learns."""
    cfg = Config.model_validate(tiny_config(
        tmp_path, shard_dir, epochs=4, **{"data.augment_on": "device", "data.decode_on": "device",
                                          "data.num_workers": 2, "data.augment.rot90": 0.5,
                                          "finetune.stages": [{"epoch": 0, "train": 1}, {"epoch": 2, "train": "all"}],
                                          "finetune.cache_views": 2}))
    with pytest.warns(UserWarning, match="data.augment_on=device on a cpu run"):
        result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "train/acc" in r]
    assert len(epochs) == 4 and result.summary["steps"] > 0
    assert sorted(p.name for p in (tmp_path / "run" / "feature_cache").rglob("view*.pt")) == ["view0.pt", "view1.pt"]
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU")
def test_on_a_gpu_nvjpeg_and_roi_align_match_the_cpu(shard_dir):
    dev = _items(shard_dir, CropDraw(32, AUG.crop_scale, AUG.crop_ratio, AUG.hflip, AUG.vflip, AUG.rot90, True))
    encoded = _collate(dev)["image"]
    aug = DeviceAugment(PRE["mean"], PRE["std"])
    on_cpu = aug.finish(encoded, torch.device("cpu"), channels_last=False)
    on_gpu = aug.finish(encoded.pin_memory(), torch.device("cuda"), channels_last=True)
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    err = _per_image_error(on_cpu, on_gpu.cpu())
    jpeg = encoded.meta[:, KIND] == JPEG
    assert err[~jpeg].max() < 1e-3  # the same uint8 pixels: roi_align and flips agree across devices
    # nvJPEG and libjpeg-turbo upsample chroma differently: on these 40 px saturated shapes up to
    # 5.2 grey levels per image (measured on an H100); a wrong box or flip costs far more
    assert err[jpeg].max() < 8.0 and err[jpeg].mean() < 5.0, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream exists on CUDA only")
def test_on_a_gpu_prefetched_jpeg_batches_equal_in_line_ones_while_the_main_stream_is_busy(shard_dir):
    """nvJPEG writes on a stream of its own: batch k+1's decode must not reuse memory that batch k's
    crop, queued on the side stream behind the main stream's work, still reads."""
    from dtl.device_batches import on_device

    dev = torch.device("cuda")
    items = _items(shard_dir, CropDraw(32, AUG.crop_scale, AUG.crop_ratio, AUG.hflip, AUG.vflip, AUG.rot90, True))
    batches = [{"image": _collate(items[i:i + 8])["image"].pin_memory(), "label": torch.arange(8) + i}
               for i in range(0, len(items) - 7, 8)] * 4
    aug = DeviceAugment(PRE["mean"], PRE["std"])
    heavy = torch.randn(4096, 4096, device=dev)
    got = []
    for x, y, b in on_device(iter(batches), dev, True, aug):
        for _ in range(4):
            heavy = heavy @ heavy / 64  # keep the main stream busy while the next batch is decoded
        got.append((x.clone(), y.clone()))
        del x, y
    torch.cuda.synchronize()
    assert len(got) == len(batches)
    for (x, y), b in zip(got, batches):
        assert torch.equal(x, aug.finish(b["image"], dev, True)) and torch.equal(y.cpu(), b["label"])
