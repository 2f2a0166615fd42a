"""Regular files of a tar stream, read straight from the 512-byte headers.

Why not `tarfile`: in stream mode it builds a TarInfo per member and parses every header field,
about 0.13 ms per member here (profiled: a quarter of the stream's time per 300 px JPEG), and
webdataset's `tar_file_expander` goes through it. Training only needs name, size and bytes, so
this reader parses those and nothing else: ustar (with its name prefix), pax extended headers
(`path`, `size`) and GNU long names, plain or gzip-compressed. Anything short is an error that
says how far the archive got, never a silently shorter shard: that includes an archive cut
exactly at a member boundary, which has no end-of-archive block (tar(1) accepts it, but every
shard writer writes the block, so its absence means the copy or download was cut).
"""
from __future__ import annotations

import gzip
import re
from typing import BinaryIO, Iterator

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: `__index__` and the like


class TarError(ValueError):
    """The archive is truncated or is not a tar file."""


class _Prepended:
    """A stream with bytes already read put back in front (to sniff gzip without seeking)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if n < 0:
            out, self.head = self.head + self.rest.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.rest.read(n - len(out)) if len(out) < n else b"")


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes and sockets may return less than asked
        more = stream.read(n - len(data))
        if not more:
            raise TarError(f"truncated tar: {what} has {len(data)} of {n} bytes")
        data += more
    return data


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"not a tar header ({what}: bad size field {field!r})") from None


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file, in archive order; skips webdataset's `__meta__` files."""
    first = stream.read(2)
    if first[:2] == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=_Prepended(first, stream))  # type: ignore[assignment]
    else:
        stream = _Prepended(first, stream)  # type: ignore[assignment]
    pax: dict[str, str] = {}
    long_name = None
    count = 0
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            if not header:
                raise TarError(f"truncated tar: no end-of-archive block after member {count}")
            header += _read_exact(stream, BLOCK - len(header), f"header after member {count}")
        if header == b"\0" * BLOCK:
            return
        if _octal(header[148:156], f"member {count + 1}") != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarError(f"not a tar file or corrupt header (checksum) at member {count + 1}")
        kind = header[156:157]
        size = _octal(header[124:136], f"member {count + 1}")
        if "size" in pax:
            size = int(pax["size"])
        data = _read_exact(stream, size, f"member {count + 1}")
        pad = -size % BLOCK
        if pad:
            _read_exact(stream, pad, f"padding of member {count + 1}")
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"g":
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        pax, long_name = {}, None
        count += 1
        if kind not in (b"0", b"\0", b"7") or _META.match(name):
            continue
        yield name, data
