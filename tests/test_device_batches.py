"""Batches onto the device: in line on a CPU, one batch ahead on a side stream on a GPU."""
import pytest
import torch

from dtl.data_pipeline import DeviceNormalize
from dtl.device_batches import as_input, on_device

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _loader(n: int, size: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g),
             "label": torch.tensor([i, i + 1, i + 2, i + 3]), "key": [f"b{i}-{j}" for j in range(4)]}
            for i in range(n)]


def test_every_batch_arrives_once_in_order_normalised_with_its_labels_and_keys():
    batches = _loader(5)
    norm = DeviceNormalize(MEAN, STD)
    got = list(on_device(iter(batches), torch.device("cpu"), True, norm))
    assert [b["key"] for _, _, b in got] == [b["key"] for b in batches]
    for (x, y, _), b in zip(got, batches):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        expected = (b["image"].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        assert torch.allclose(x, expected, atol=1e-5)
        assert torch.equal(y, b["label"])
    assert list(on_device(iter([]), torch.device("cpu"), False, norm)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream exists on CUDA only (run on a GPU machine)")
def test_on_a_gpu_the_side_stream_copies_equal_the_in_line_ones_while_the_main_stream_is_busy():
    """30 prefetched batches, each consumed on the main stream behind a queue of large matmuls, equal
    their in-line copies in content and order (labels too). What it does not prove: that the side
    stream ever overlaps the main one (the speed-up is the bench's to show)."""
    dev = torch.device("cuda")
    batches = [{**b, "image": b["image"].pin_memory(), "label": b["label"].pin_memory()} for b in _loader(30, 224)]
    norm = DeviceNormalize(MEAN, STD)
    heavy = torch.randn(4096, 4096, device=dev)
    got = []
    for x, y, b in on_device(iter(batches), dev, True, norm):
        for _ in range(4):
            heavy = heavy @ heavy / 64  # keep the main stream busy while the next copy is in flight
        got.append((x.sum(dtype=torch.float64), y.clone(), x.clone()))
        del x, y
    torch.cuda.synchronize()
    assert len(got) == len(batches)
    for (s, y, x), b in zip(got, batches):
        ref = as_input(b["image"], dev, True, norm)
        assert torch.equal(x, ref) and float(s) == float(ref.sum(dtype=torch.float64))
        assert torch.equal(y.cpu(), b["label"])
