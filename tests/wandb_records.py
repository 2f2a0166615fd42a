"""Read a W&B offline run file (`run-ID.wandb`): a LevelDB-style log of protobuf records.

wandb's own Python reader was dropped when its core moved to Go; the format is small: a 7-byte
header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def read_records(path: str | Path, wait_s: float = 60.0) -> list:
    """Every record of the run file. W&B's service may still be writing when `wandb.finish()` has
    returned (seen under load: the last history row missing from a file read at once), so the file
    is read again until it holds its `exit` record, for at most `wait_s`."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = _parse(path)
        except Exception:  # a record cut mid-write
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _parse(path: str | Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    out = []
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        out.append(r)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: str | Path) -> list[dict]:
    return [{_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in read_records(path) if r.WhichOneof("record_type") == "history"]


def _updates(path: str | Path, record_type: str) -> dict:
    """Merged key/value updates of every `config` or `summary` record."""
    out: dict = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == record_type:
            out.update({_key(i): json.loads(i.value_json) for i in getattr(r, record_type).update})
    return out


def config(path: str | Path) -> dict:
    return _updates(path, "config")


def summary(path: str | Path) -> dict:
    return _updates(path, "summary")


def artifacts(path: str | Path) -> list:
    """The `artifact` records of a run file (tables, models, datasets), in order."""
    return [r.artifact for r in read_records(path) if r.WhichOneof("record_type") == "artifact"]
