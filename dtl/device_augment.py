"""Training images cropped, resized and flipped on the device, and JPEGs decoded there (FFCV's and
DALI's split of the work), for a GPU that the loader's CPUs cannot keep fed.

`data.augment_on=device`: a loader worker no longer runs timm's per-image PIL pipeline (decode 0.8 ms,
bicubic random-resized crop 1.3 ms, flips, tensor: about 2.4 ms per 300 px image on one core). It
reads the sample, draws the image's crop and flips exactly as timm's transforms would (same
generators, same order, seeded by (seed, epoch, key) as ever), and hands over the image still
encoded (a JPEG's bytes, `data.decode_on=device`) or decoded to uint8 (PIL, any format). The
training process then finishes a whole batch on the device: nvJPEG decodes the JPEGs in one batched
call, one `roi_align` per image size crops and resizes every image (bilinear, averaged over
ceil(crop / size)^2 points per output pixel when shrinking: antialiased), flips are two masked
`flip`s, normalisation one fused op.

A batch travels as `EncodedImages`: every image's bytes in one flat uint8 tensor, plus one row of
metadata per image (offset, length, kind, size, crop box, output size, flips), so a worker sends
two tensors per batch, not one per image. The workers open each JPEG's header and check its end
marker (a file cut short, or with data after its end, is decoded there by PIL, under `on_error` as
ever); a JPEG whose scan is corrupt is found only on the device: its batch is decoded image by
image, on the CPU where nvJPEG refuses, and one the CPU cannot decode either stops the run naming
its key (`decode_on=workers` with `on_error=skip` skips such samples instead).
"""
from __future__ import annotations

import io
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dtl.data_pipeline import DeviceNormalize
from dtl.dataset_index import DataError
from dtl.shard_stream import image_bytes, load_rgb
from dtl.user_errors import DtlWarning, first_line

JPEG, RAW = 0, 1            # how an image travels: encoded JPEG bytes, or decoded uint8 HWC RGB
HFLIP, VFLIP, ROT90 = 1, 2, 4
# one row per image of EncodedImages.meta
OFFSET, NBYTES, KIND, HEIGHT, WIDTH, TOP, LEFT, CROP_H, CROP_W, SIZE, FLAGS = range(11)


class EncodedImages:
    """A batch's images as the workers leave them: `data` (all bytes, flat uint8), `meta` (N x 11
    int64). DataLoader pins it through `pin_memory` and sends its two tensors through shared memory."""

    def __init__(self, data: torch.Tensor, meta: torch.Tensor, keys: Sequence[str] = ()):
        self.data, self.meta, self.keys = data, meta, list(keys)

    def __len__(self) -> int:
        return len(self.meta)

    def pin_memory(self) -> "EncodedImages":
        return EncodedImages(self.data.pin_memory(), self.meta.pin_memory(), self.keys)

    @staticmethod
    def pack(items: Sequence[tuple[torch.Tensor, torch.Tensor]], keys: Sequence[str] = ()) -> "EncodedImages":
        """One batch from the workers' (payload, meta row) items, offsets filled in."""
        meta = torch.stack([m for _, m in items])
        sizes = torch.tensor([p.numel() for p, _ in items], dtype=torch.int64)
        meta[:, NBYTES] = sizes
        meta[:, OFFSET] = torch.cumsum(sizes, 0) - sizes
        return EncodedImages(torch.cat([p.reshape(-1) for p, _ in items]), meta, keys)


class OpenedImage:
    """A sample's image as a worker holds it before the crop is drawn: the payload to send and its size."""

    def __init__(self, payload: torch.Tensor, kind: int, width: int, height: int):
        self.payload, self.kind, self.size = payload, kind, (width, height)


def open_image(sample: dict, decode_on_device: bool, draft_size: Optional[int] = None) -> OpenedImage:
    """The sample's image, to send as JPEG bytes or decoded here to uint8 RGB. Bytes: with
    `decode_on_device`, a JPEG in L or RGB that ends with its end-of-image marker and that PIL's draft
    would not shrink (under twice `draft_size` on a side). Decoded here: anything else PIL opens, a
    large JPEG at the draft's reduced scale (as the CPU path decodes it: the same boxes, a bounded
    batch on the device), a JPEG with data after its end (motion photos) or cut short (PIL names it).
    Raises on a missing field or an image PIL cannot read, for the stream's `on_error`."""
    data = image_bytes(sample)
    img = Image.open(io.BytesIO(data))  # the header only
    if decode_on_device and img.format == "JPEG" and img.mode in ("L", "RGB") \
            and not (draft_size and min(img.size) >= 2 * draft_size) and data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return OpenedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), JPEG, *img.size)
    img = load_rgb(img, draft_size)  # as the CPU path decodes it
    return OpenedImage(torch.from_numpy(np.asarray(img).copy()), RAW, *img.size)


class CropDraw:
    """The worker's half of the training transform: each image's random-resized crop and flips,
    drawn as timm's `transforms_imagenet_train` draws them (quarter turn: torch; crop: `random`,
    timm's `get_params`; flips: torch, each only when its probability is set), so the same seed
    gives the same boxes as the CPU path. Picklable (forkserver workers)."""

    encoded = True   # ShardStream hands it an `OpenedImage`, not a PIL image

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float, vflip: float,
                 rot90: float, decode_on_device: bool):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.decode_on_device = decode_on_device

    def open(self, sample: dict, draft_size: Optional[int]) -> OpenedImage:
        return open_image(sample, self.decode_on_device, draft_size)

    def __call__(self, img: OpenedImage) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.transforms import RandomResizedCropAndInterpolation

        width, height = img.size
        flags = 0
        if self.rot90 and torch.rand(1).item() < self.rot90:  # RandomQuarterTurn, before the crop
            flags |= ROT90
            width, height = height, width
        shape_only = torch.empty(1, dtype=torch.uint8).expand(1, height, width)  # all get_params reads
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(shape_only, self.scale, self.ratio)
        if self.hflip > 0 and torch.rand(1) < self.hflip:
            flags |= HFLIP
        if self.vflip > 0 and torch.rand(1) < self.vflip:
            flags |= VFLIP
        h_stored, w_stored = (img.size[1], img.size[0])
        meta = torch.tensor([0, 0, img.kind, h_stored, w_stored, top, left, h, w, self.size, flags], dtype=torch.int64)
        return img.payload, meta

    def __repr__(self) -> str:
        return (f"CropDraw(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"vflip={self.vflip}, rot90={self.rot90}, decode_on_device={self.decode_on_device})")


class DeviceAugment(DeviceNormalize):
    """The device's half: decode, crop + resize, flip and normalise an `EncodedImages` batch where the
    model is. Also normalises plain uint8 batches (evaluation's), as `DeviceNormalize`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], chunk_bytes: int = 1 << 30):
        super().__init__(mean, std)
        self.chunk_bytes = chunk_bytes   # float32 images converted at once: bounds the device memory for large ones
        self._decode_streams: dict[torch.device, torch.cuda.Stream] = {}

    def images(self, batch: EncodedImages, rows: list[list[int]], device: torch.device) -> list[torch.Tensor]:
        """Each image of the batch (`rows`: its meta as lists) as CHW uint8 RGB on `device`, quarter turns applied."""
        out: list[Optional[torch.Tensor]] = [None] * len(rows)
        jpegs = [i for i, r in enumerate(rows) if r[KIND] == JPEG]
        if jpegs:
            for i, img in zip(jpegs, self._decode_jpegs(batch, [rows[i] for i in jpegs], jpegs, device)):
                out[i] = img
        if len(jpegs) < len(rows):
            data = batch.data.to(device, non_blocking=True)
            for i, r in enumerate(rows):
                if r[KIND] == RAW:
                    out[i] = data[r[OFFSET]:r[OFFSET] + r[NBYTES]].view(r[HEIGHT], r[WIDTH], 3).permute(2, 0, 1)
        for i, r in enumerate(rows):
            img = out[i]
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            if r[FLAGS] & ROT90:  # counter-clockwise, as PIL's ROTATE_90
                img = torch.rot90(img, 1, (1, 2))
            out[i] = img
        return out  # type: ignore[return-value]

    def _decode_jpegs(self, batch: EncodedImages, rows: list[list[int]], index: list[int],
                      device: torch.device) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        views = [batch.data[r[OFFSET]:r[OFFSET] + r[NBYTES]] for r in rows]
        if device.type == "cuda":
            try:
                return self._nvjpeg(views, device)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # an image nvJPEG cannot take fails the whole batch: this batch one by one
                warnings.warn(f"nvJPEG failed on a batch ({first_line(e)[:120]}); decoding it image by image",
                              DtlWarning)
        out = []
        for v, i in zip(views, index):
            img = self._nvjpeg_or_none(v, device) if device.type == "cuda" else None
            if img is None:  # on the CPU
                try:
                    img = decode_jpeg(v, mode=ImageReadMode.UNCHANGED).to(device, non_blocking=True)
                except RuntimeError as e:
                    key = batch.keys[i] if i < len(batch.keys) else f"#{i}"
                    raise DataError(f"sample {key}: undecodable JPEG ({first_line(e)[:120]}); with "
                                    f"data.decode_on=workers, data.on_error=skip would skip it") from None
            out.append(img)
        return out

    def _nvjpeg_or_none(self, view: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """One image through nvJPEG; None where nvJPEG refuses it (out of memory is no data error)."""
        try:
            return self._nvjpeg([view], device)[0]
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            return None

    def _nvjpeg(self, views: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Batched nvJPEG on a stream of its own. torchvision allocates the outputs on the caller's
        stream and writes them on nvJPEG's, which waits for nothing: on the caller's stream (the side
        stream, still cropping the batch before) a freed block would be handed straight back and
        overwritten under the pending crop. From a stream of their own, with `record_stream` on the
        caller's, the blocks come back only once the caller's work on them is done."""
        from torchvision.io import ImageReadMode, decode_jpeg

        caller = torch.cuda.current_stream(device)
        stream = self._decode_streams.setdefault(device, torch.cuda.Stream(device))
        with torch.cuda.stream(stream):
            imgs = decode_jpeg(views, mode=ImageReadMode.UNCHANGED, device=device)
        caller.wait_stream(stream)
        for img in imgs:
            img.record_stream(caller)
        return imgs

    def finish(self, batch: EncodedImages, device: torch.device, channels_last: bool) -> torch.Tensor:
        """The batch as the model's normalised float input, (N, 3, size, size)."""
        from torchvision.ops import roi_align

        rows = batch.meta.tolist()
        imgs = self.images(batch, rows, device)
        meta = batch.meta.to(device, non_blocking=True)
        size = rows[0][SIZE]
        out = torch.empty(len(rows), 3, size, size, device=device)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(imgs):
            by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
        for (h, w), same in by_shape.items():  # one call per image size: boxes never see another image's padding
            per = max(1, self.chunk_bytes // (3 * h * w * 4))
            for idx in (same[i:i + per] for i in range(0, len(same), per)):
                stack = torch.stack([imgs[i] for i in idx]).float()
                m = meta[idx]
                top, left = m[:, TOP].float(), m[:, LEFT].float()
                boxes = torch.stack([torch.arange(len(idx), device=device, dtype=torch.float), left, top,
                                     left + m[:, CROP_W].float(), top + m[:, CROP_H].float()], 1)
                out[idx] = roi_align(stack, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flags = meta[:, FLAGS]
        out = torch.where((flags & HFLIP).bool().view(-1, 1, 1, 1), out.flip(3), out)
        out = torch.where((flags & VFLIP).bool().view(-1, 1, 1, 1), out.flip(2), out)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return self(out)

