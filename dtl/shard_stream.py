"""Stream labelled images from WebDataset shards, split exactly across ranks and workers.

How an epoch is cut (the stream's epoch contract, docs/architecture.md):
  1. The shard order is shuffled with a seed made of (seed, epoch); every rank computes the same.
  2. With per-shard sample counts (from dataset.json), the samples of that order are numbered
     0..N-1 and every (rank, worker) slot reads one contiguous range of them. Training gives each
     slot exactly N // slots samples (the last N % slots of the order are dropped: fewer than
     ranks x workers samples, different ones each epoch), so every rank takes the same number of
     batches and no all-reduce waits forever; a slot decodes only the whole batches of them.
     Evaluation gives slots ranges that differ by at most one sample, so every sample is
     evaluated exactly once.
  3. Without counts, shards are dealt round-robin to slots as webdataset's split_by_node +
     split_by_worker would, and each slot reads its shards in a loop until it has N // slots
     samples (N stated in the config); with fewer shards than slots each slot reads every shard
     and keeps every slots-th sample instead (slower, still exactly once).
  4. A shuffle buffer seeded by (seed, epoch, slot) mixes each slot's samples; a resumed run skips
     the samples its slot already delivered, so it sees the same ids as an uninterrupted run.

Opening local, `pipe:` and URL shards is webdataset's job (`gopen`); tar members are read by
`tar_members` (a header parser about 30x cheaper per member than `tarfile`); bad samples follow `on_error`: 'error' stops naming shard and
key, 'skip' logs each one to `bad_samples.rank{N}.jsonl` and stops once `max_errors` is exceeded
(every sample lost counts, including those a truncated shard never delivered).
"""
from __future__ import annotations

import atexit
import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import warnings
import zlib
from dataclasses import dataclass
from bisect import bisect_right
from itertools import accumulate, islice
from typing import Any, Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from dtl.dataset_index import (IMAGE_EXTENSIONS, DataError, SplitSource, expand_shards, is_local,  # noqa: F401
                               read_index, split_source)
from dtl.shard_fetch import RetryPolicy, read_with_retries
from dtl.tar_members import tar_members
from dtl.worker_server import STOP_SIGNALS, start_worker_server, worker_context  # noqa: F401 (re-exported)
from dtl.user_errors import DtlWarning

IMAGE_FIELDS = IMAGE_EXTENSIONS


def group_members(members: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Group consecutive tar members into samples.

    Unlike webdataset's default (key = name up to the first dot), the key is the name up to the
    last dot, and a member whose key extends the current one (`x.seg.png` after `x.cls`) joins it:
    so keys may contain dots (`img.v2.jpg` -> key `img.v2`) and multi-part fields still work.
    """
    current: Optional[dict] = None
    for fname, data in members:
        stem, dot, ext = fname.rpartition(".")
        if not dot or "/" in ext:
            continue  # no extension: not part of any sample
        key = current["__key__"] if current else None
        if current is not None and (stem == key or stem.startswith(key + ".")) \
                and fname[len(key) + 1:] not in current:
            current[fname[len(key) + 1:]] = data
            continue
        if current is not None:
            yield current
        current = {"__key__": stem, "__url__": url, ext: data}
    if current is not None:
        yield current


def iter_tar_samples(url: str, retry: Optional[RetryPolicy] = None) -> Iterator[dict]:
    """Samples of one shard. Local files and fsspec URLs open with webdataset's gopen; http(s)
    and `pipe:` shards are retried on transient failures without losing or repeating a sample
    (`shard_fetch`)."""
    return read_with_retries(url, lambda stream, u: group_members(tar_members(stream), u), retry)


def read_label(sample: dict, label_field: str, num_classes: int, classes: Optional[list[str]] = None) -> int:
    """Class index from `cls`, `txt` or `json.FIELD`; names are looked up in `classes`."""
    name, _, sub = label_field.partition(".")
    raw = sample.get(name)
    if raw is None:
        fields = sorted(k for k in sample if not k.startswith('__'))
        raise ValueError(f"missing label field {name!r} (data.label_field={label_field!r}; the sample's fields: {fields})")
    if name == "json":
        value: Any = json.loads(raw)
        for part in sub.split(".") if sub else []:
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"json has no field {sub!r} (data.label_field={label_field!r})")
            value = value[part]
    else:
        value = raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if classes and value in classes:
            return classes.index(value)
        raise ValueError(f"label {value!r} is neither an integer nor a class name")
    label = int(value)
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside the {num_classes} classes")
    return label


_IN_MEMORY_FILE = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def image_bytes(sample: dict) -> bytes:
    """The sample's encoded image (its first image field)."""
    for name in IMAGE_FIELDS:
        if name in sample:
            return sample[name]
    raise ValueError(f"no image field (expected one of {IMAGE_FIELDS}; fields: "
                     f"{sorted(k for k in sample if not k.startswith('__'))})")


def decode_image(sample: dict, draft_size: Optional[int] = None) -> Image.Image:
    """The image field as RGB. JPEGs decode at reduced scale (PIL draft) when the target is small."""
    return load_rgb(Image.open(io.BytesIO(image_bytes(sample))), draft_size)


def load_rgb(img: Image.Image, draft_size: Optional[int] = None) -> Image.Image:
    """An opened (header-only) image decoded as RGB, a JPEG at PIL's draft scale for `draft_size`."""
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode.startswith("I"):  # 16-bit grey: PIL's own convert clips at 255
        img = _grey_to_8bit(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (X-rays, microscopy; 16-bit PNG, PGM, TIFF) scaled to 8 bits as its
    viewer shows it, 0..65535 -> 0..255, not clipped. By mode, never by content, so a dark image
    stays dark: 'I;16*' and 'I' (how PIL opens 16-bit PGM, and 16-bit PNG in some versions) are
    16-bit. ('F', float, keeps PIL's own reading: values 0..255.)"""
    import numpy as np

    a = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")


def balanced_repeats(class_counts: list[int], power: float) -> list[float]:
    """Expected copies per sample of each class so that class c's share of an epoch is
    proportional to count_c ** (1 - power): below 1 a sample is left out at random."""
    counts = [max(1, c) for c in class_counts]
    total = sum(counts)
    shares = [c ** (1 - power) for c in counts]
    norm = sum(shares)
    return [(s / norm) / (c / total) for s, c in zip(shares, counts)]


def _shuffled(items: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


@dataclass
class StreamOptions:
    classes: list[str]
    label_field: str = "cls"
    train: bool = False
    seed: int = 0
    shuffle_buffer: int = 1000
    on_error: str = "error"
    max_errors: int = 10
    draft_size: Optional[int] = None
    error_log: Optional[str] = None
    seeded: bool = False   # seed augmentation by (seed, epoch, key) outside training too (probe views)
    aug_epoch: Optional[int] = None   # seed augmentation as this epoch's (cached feature views)
    keys_only: bool = False   # labels and keys, no image decoded (the order of a cached epoch)
    retry: Optional[RetryPolicy] = None   # remote shards: retries, backoff, read timeout
    repeats: Optional[list[float]] = None   # training: expected copies of a sample per class (balanced sampling)


class ShardStream(IterableDataset):
    """One split's samples as (image tensor, label, key) for this rank's DataLoader workers."""

    def __init__(self, source: SplitSource, transform: Callable, options: StreamOptions,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.source, self.transform, self.opt = source, transform, options
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        # What set_epoch chooses, in shared memory: a loader's persistent workers hold a copy of this
        # stream made when they started, and read the epoch, batch size and resume skip from here.
        self._state = torch.zeros(3 + self.num_workers, dtype=torch.int64).share_memory_()
        self._view = self._state  # what this process reads: a private snapshot during a pass (`__iter__`)
        self.batch_size = 1
        self.slots = self.world_size * self.num_workers
        if options.train and source.total // self.slots == 0:
            raise DataError(f"split {source.name!r} has {source.total} samples, fewer than "
                            f"ranks x workers = {self.slots}")
        if source.counts is None and len(source.urls) < self.slots:
            warnings.warn(f"split {source.name!r}: {len(source.urls)} shards for {self.slots} rank x worker "
                          f"slots; every slot reads every shard and keeps every {self.slots}-th sample "
                          f"(exact, but reads the data {self.slots} times). Write more shards.", DtlWarning)

    # -- epoch bookkeeping (shared with the workers) ----------------------------------------
    def _set(self, i: int, value) -> None:
        self._state[i] = value
        self._view = self._state

    epoch = property(lambda self: int(self._view[0]), lambda self, v: self._set(0, v))
    batch_size = property(lambda self: int(self._view[1]), lambda self, v: self._set(1, v))
    worker_offset = property(lambda self: int(self._view[2]), lambda self, v: self._set(2, v))

    @property
    def skip_per_worker(self) -> list[int]:
        return self._view[3:].tolist()

    @skip_per_worker.setter
    def skip_per_worker(self, skips: list[int]) -> None:
        self._set(slice(3, None), torch.tensor(skips, dtype=torch.int64))

    def __copy__(self) -> "ShardStream":
        """A copy with epoch state of its own (the feature cache's keyed view of the training stream)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._state = new._view = self._state.clone().share_memory_()
        return new

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Select the epoch; skip the first `skip_batches` batches the loader already delivered.
        In training, each slot then decodes whole batches of `batch_size` only: the loader would
        drop the rest (decoding them cost 16 % of the work at 12 workers x 128 on ELPV's 7,340)."""
        self.epoch = epoch
        self.batch_size = batch_size
        w = self.num_workers
        self.skip_per_worker = [math.ceil(max(0, skip_batches - i) / w) * batch_size for i in range(w)]
        # The DataLoader takes batches round-robin starting at worker 0: on resume, loader worker i
        # plays the part of worker (i + skipped) % w, so the next batch comes from the right one.
        self.worker_offset = skip_batches % w

    def samples_per_slot(self) -> int:
        return self.source.total // self.slots

    def _shard_order(self) -> list[int]:
        order = list(range(len(self.source.urls)))
        if self.opt.train:
            random.Random(f"shards/{self.opt.seed}/{self.epoch}").shuffle(order)
        return order

    def _slot(self) -> int:
        info = get_worker_info()
        worker = (info.id + self.worker_offset) % self.num_workers if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers, loader has {info.num_workers}")
        return self.rank * self.num_workers + worker

    # -- raw samples -----------------------------------------------------------------------
    def _read_shard(self, url: str, expected: Optional[int], start: int = 0,
                    stop: Optional[int] = None) -> Iterator[dict]:
        """Samples [start, stop) of one shard. A shard that breaks or ends early loses every sample
        of that range it did not deliver: each one is counted and logged (`on_error=skip`)."""
        n, key = 0, None
        stop = expected if stop is None else stop
        try:
            samples = iter_tar_samples(url, self.opt.retry)
            for sample in samples:
                key = sample.get("__key__")
                if n >= start:
                    yield sample
                n += 1
                if stop is not None and n >= stop:
                    if stop == expected and self.opt.retry is not None and self.opt.retry.cache is not None:
                        for _ in samples:  # read to the archive's end, so the shard cache keeps the copy
                            pass
                    return
        except Exception as e:  # tar or transport error: name the shard and where it broke
            if isinstance(e, FileNotFoundError) and is_local(url):
                raise DataError(f"shard {url}: file not found (moved or deleted?)") from None  # none of it readable
            lost = max(1, (stop or 0) - max(n, start))
            self._bad(url, key, f"unreadable shard after {n} samples ({type(e).__name__}: {e})", lost, max(n, start))
            return
        if expected is not None and n < expected and stop is not None and n < stop:
            self._bad(url, key, f"shard holds {n} samples, dataset.json says {expected} (truncated?)",
                      stop - max(n, start), max(n, start))

    def _range(self, order: list[int], start: int, stop: int) -> Iterator[dict]:
        """Samples numbered [start, stop) in the epoch's shard order; numbers past N wrap around.
        The first shard is found by bisection over cumulative counts: planning stays cheap at 100k shards."""
        counts, total = self.source.counts, self.source.total
        ends = list(accumulate(counts[i] for i in order))   # where each position of the order ends
        pos = start
        while pos < stop:
            lap, off = divmod(pos, total)
            j = bisect_right(ends, off)
            a = lap * total + (ends[j - 1] if j else 0)
            hi = min(lap * total + ends[j], stop)
            idx = order[j]
            yield from self._read_shard(self.source.urls[idx], counts[idx], pos - a, hi - a)
            pos = hi

    def _uncounted(self, order: list[int], slot: int) -> Iterator[dict]:
        urls = [self.source.urls[i] for i in order]
        if len(urls) >= self.slots:
            mine = urls[slot::self.slots]
            while True:  # resample my shards until the caller has enough
                got = 0
                for url in mine:
                    for s in self._read_shard(url, None):
                        got += 1
                        yield s
                if got == 0:
                    raise DataError(f"shards {mine} hold no samples")
        else:
            n = 0
            for url in urls:
                for s in self._read_shard(url, None):
                    if n % self.slots == slot:
                        yield s
                    n += 1

    def _raw(self, slot: int) -> tuple[Iterator[dict], Iterator[dict], int]:
        """(this slot's own samples, samples to fill in for skipped ones, target count)."""
        order, total = self._shard_order(), self.source.total
        if self.source.counts is None:
            per = total // self.slots
            stream = self._uncounted(order, slot)
            return islice(stream, per), stream, (per if self.opt.train else 0)
        if self.opt.train:
            per = total // self.slots
            start, stop = slot * per, (slot + 1) * per
            return self._range(order, start, stop), self._range(order, stop, stop + total), per
        start, stop = slot * total // self.slots, (slot + 1) * total // self.slots
        return self._range(order, start, stop), iter(()), 0

    def _resampled(self, samples: Iterator[dict], tag: str = "") -> Iterator[dict]:
        """Balanced sampling: each sample comes floor(r) or ceil(r) times (r: its class's repeat
        factor), drawn from (seed, epoch, key), so a resumed epoch replays the same draws; copies
        carry their number, which seeds their augmentation. `tag` marks the fill-in samples (they
        may be a second pass over this slot's own): fresh draws, fresh augmentation."""
        repeats = self.opt.repeats
        for sample in samples:
            try:
                label = read_label(sample, self.opt.label_field, len(self.opt.classes), self.opt.classes)
            except Exception:
                yield sample  # _decode reports it under data.on_error
                continue
            r = repeats[label]
            u = zlib.crc32(f"balance/{self.opt.seed}/{self.epoch}/{sample.get('__key__')}{tag}".encode()) / 2**32
            for copy in range(int(r) + (u < r - int(r))):
                yield sample if copy == 0 and not tag else {**sample, "__copy__": f"{tag}{copy}"}

    # -- decoding and policy -----------------------------------------------------------------
    def _bad(self, url: str, key: Optional[str], reason: str, lost: int = 1, position: Optional[int] = None) -> None:
        """Apply `on_error` to `lost` samples (more than one when a shard broke off early)."""
        what = (f"sample {key}" if lost == 1 else f"{lost} samples after {key}" if key is not None
                else f"{lost} samples from its start")
        msg = f"shard {url}, {what}: {reason}"
        if self.opt.on_error == "error":
            raise DataError(msg + "  (data.on_error=skip, or dtl eval --on-error skip, skips bad samples)")
        self._errors += lost
        if self.opt.error_log:
            with open(self.opt.error_log, "a") as f:
                for i in range(lost):
                    f.write(json.dumps({"split": self.source.name, "epoch": self.epoch, "shard": url,
                                        "key": key if lost == 1 else None,
                                        "position": None if position is None else position + i,
                                        "reason": reason}) + "\n")
        warnings.warn(f"skipped: {msg}", DtlWarning)
        if self._errors > self.opt.max_errors:
            raise DataError(f"more than data.max_errors={self.opt.max_errors} bad samples in split "
                            f"{self.source.name!r} (one worker); last: {msg}")

    def _decode(self, sample: dict) -> Optional[tuple[torch.Tensor, int, str]]:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            label = read_label(sample, self.opt.label_field, len(self.opt.classes), self.opt.classes)
            if self.opt.keys_only:
                return torch.zeros(0), label, key
            if getattr(self.transform, "encoded", False):  # data.augment_on=device: bytes or uint8, crop drawn below
                img = self.transform.open(sample, self.opt.draft_size)
            else:
                img = decode_image(sample, self.opt.draft_size)
        except Exception as e:  # PIL names the in-memory file object ("<_io.BytesIO object at 0x...>"): no help
            self._bad(url, key, f"{type(e).__name__}: {_IN_MEMORY_FILE.sub('', str(e))}")
            return None
        if self.opt.train or self.opt.seeded:  # augmentation as a function of (seed, epoch, key): exact on resume
            epoch = self.epoch if self.opt.aug_epoch is None else self.opt.aug_epoch
            copy = f"/{sample['__copy__']}" if "__copy__" in sample else ""  # balanced sampling's repeats
            seed = zlib.crc32(f"{self.opt.seed}/{epoch}/{key}{copy}".encode())
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs 0.1 ms (CUDA bookkeeping)
            random.seed(seed)
        return self.transform(img), label, key

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        # One pass reads one epoch's state: a worker still finishing an abandoned pass must not see
        # the next epoch's `set_epoch` (its bad-sample log would name the wrong epoch).
        self._view = self._state.clone()
        self._errors = 0
        slot = self._slot()
        own, fill, target = self._raw(slot)
        if self.opt.train:  # decode no more than whole batches: the loader's drop_last throws the rest away
            target -= target % self.batch_size
            if target == 0:
                return
        if self.opt.train and self.opt.repeats:
            own, fill = self._resampled(own), self._resampled(fill, "+")
        if self.opt.train and self.opt.shuffle_buffer > 1:
            own = _shuffled(own, self.opt.shuffle_buffer, random.Random(f"buf/{self.opt.seed}/{self.epoch}/{slot}"))
        worker = slot % self.num_workers
        skip = self.skip_per_worker[worker]
        produced, filled = skip, 0
        for sample in islice(own, skip, None):
            if target and produced >= target:
                if self.opt.retry is not None and self.opt.retry.cache is not None:
                    for _ in own:  # read, not decode, the rest: the shard cache keeps whole shards
                        pass
                return
            item = self._decode(sample)
            if item is not None:
                produced += 1
                yield item
        while produced < target:  # skipped samples are replaced so every rank keeps its step count
            sample = next(fill, None)
            if sample is None:  # shards without counts, fewer than the slots, hold fewer than declared
                skipped = f", after {self._errors} skipped as bad" if self._errors else ""
                raise DataError(f"split {self.source.name!r}: its shards hold fewer good samples than the "
                                f"{self.source.total} declared (data.samples.{self.source.name}){skipped}; "
                                f"slot {slot} got {produced} of its {target}")
            item = self._decode(sample)
            if item is not None:
                produced, filled = produced + 1, filled + 1
                yield item
        if filled and self._errors:  # (balanced sampling falls short or over by design)
            warnings.warn(f"split {self.source.name!r} slot {slot}: filled {filled} skipped samples "
                          f"with samples from later in the epoch", DtlWarning)


def _collate(batch: list[tuple[Any, int, str]]) -> dict:
    if isinstance(batch[0][0], tuple):  # data.augment_on=device: (payload, crop) per image, finished on the device
        from dtl.device_augment import EncodedImages

        keys = [k for _, _, k in batch]
        return {"image": EncodedImages.pack([x for x, _, _ in batch], keys),
                "label": torch.tensor([y for _, y, _ in batch]), "key": keys}
    # default_collate stacks straight into shared memory inside a worker: one copy fewer per batch.
    images, labels, keys = default_collate(batch)
    return {"image": images, "label": labels, "key": keys}


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave the stop signals to the training process.

    Slurm (scancel, time limit, preemption) and `timeout` signal every process of the job; a
    worker killed by SIGTERM takes its loader down ("DataLoader worker exited unexpectedly") in
    the middle of the step or validation the trainer is finishing before its checkpoint. Workers
    still end with their loader, and with the trainer if it dies (`_release_worker_server`).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # discards one that arrived while the server's mask held it
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _release_worker_server()


def _release_worker_server() -> None:
    """Close this worker's copy of the forkserver's keep-alive pipe (every child of the server holds
    one, so that it could start processes of its own; a worker never does). The server then exits as
    soon as the trainer is gone, however it ended (SIGKILL, OOM), and PyTorch's watchdog, which
    watches the worker's parent (the server, not the trainer), ends the workers: no orphans."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None


def _kill_leftover_workers() -> None:
    """At the trainer's exit: workers ignore SIGTERM, so multiprocessing's own exit hook (terminate,
    then join every daemonic child) would wait forever on the workers of a loader left open (an
    error raised mid-epoch keeps its iterator alive). They hold nothing to save: SIGKILL them first."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(timeout=5)


_exit_hook = False


def make_loader(stream: ShardStream, batch_size: int, num_workers: int,
                start_method: str = "forkserver", persistent: bool = False) -> DataLoader:
    """A DataLoader over the stream; training drops each worker's last partial batch. `persistent`:
    the workers outlive an epoch and start the next from the stream's shared epoch state."""
    global _exit_hook
    if num_workers and not _exit_hook:  # registered after multiprocessing's hook, so it runs before it
        atexit.register(_kill_leftover_workers)
        _exit_hook = True
    # A generator of its own: a DataLoader draws its workers' base seed from the global CPU generator
    # each time it starts a pass, and the model's CPU dropout draws from that one too. Persistent and
    # restarted loaders (a resumed run) would draw a different number of times; the workers' seeds do
    # not matter anyway (the stream seeds each sample's augmentation from (seed, epoch, key)).
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                      drop_last=stream.opt.train, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(stream.opt.seed),
                      persistent_workers=persistent and num_workers > 0,
                      worker_init_fn=_ignore_stop_signals if num_workers else None,
                      multiprocessing_context=worker_context(start_method) if num_workers else None)


def close_loader(loader: DataLoader) -> None:
    """End a persistent loader's workers now (they ignore SIGTERM, so they are asked to leave)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def batches_per_epoch(stream: ShardStream, batch_size: int) -> int:
    """Training batches per rank per epoch: the same on every rank by construction."""
    return stream.num_workers * (stream.samples_per_slot() // batch_size)
