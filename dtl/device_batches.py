"""Loader batches onto the accelerator: as the model takes them, and, on a GPU, one batch ahead.

On CUDA the next batch's host-to-device copy and normalisation run on a side stream while the
current step computes (timm's PrefetchLoader), and no copy blocks the host: a blocking copy (a
plain `.to(device)` of the labels) makes the CPU wait for every kernel already queued, so it can
never run ahead of the GPU and each step pays for its own launches and the loader's hand-off.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from dtl.data_pipeline import DeviceNormalize
from dtl.device_augment import DeviceAugment, EncodedImages


def as_input(x: torch.Tensor, device: torch.device, channels_last: bool,
             normalize: Optional[DeviceNormalize] = None) -> torch.Tensor:
    """An image batch on the device, channels-last when the model is (a copy inside every conv otherwise);
    a uint8 batch is copied as uint8 and normalised there; an encoded one (data.augment_on=device) is
    decoded, cropped, resized and flipped there too."""
    if isinstance(x, EncodedImages):
        if not isinstance(normalize, DeviceAugment):
            raise ValueError("an encoded image batch needs DeviceAugment (Data.normalize) to finish it")
        return normalize.finish(x, device, channels_last)
    if x.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("a uint8 image batch needs its normalisation (Data.normalize)")
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return normalize(x)
    if channels_last and x.dim() == 4:
        return x.to(device, memory_format=torch.channels_last, non_blocking=True)
    return x.to(device, non_blocking=True)


def on_device(batches: Iterable[dict], device: torch.device, channels_last: bool,
              normalize: Optional[DeviceNormalize] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(inputs, labels, the loader's batch) for each batch, inputs and labels on `device`. On CUDA the
    copy of batch k+1 is issued on a side stream before batch k is handed out; elsewhere in line."""
    if device.type != "cuda":
        for b in batches:
            yield as_input(b["image"], device, channels_last, normalize), b["label"].to(device), b
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(b: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        side.wait_stream(main)  # the normalisation's constants, and memory the main stream just freed
        with torch.cuda.stream(side):
            return as_input(b["image"], device, channels_last, normalize), b["label"].to(device, non_blocking=True), b

    it = iter(batches)
    ahead = next(it, None)
    ahead = issue(ahead) if ahead is not None else None
    while ahead is not None:
        main.wait_stream(side)
        x, y, b = ahead
        x.record_stream(main)  # made on the side stream, used and freed on the main one
        y.record_stream(main)
        nxt = next(it, None)
        ahead = issue(nxt) if nxt is not None else None
        yield x, y, b
