"""The tar header parser against archives written by Python's tarfile in every format."""
import gzip
import io
import tarfile

import pytest

from dtl.tar_members import TarError, tar_members

FILES = {
    "a.cls": b"1",
    "sub/dir/img.v2.jpg": b"x" * 1000,
    "x" * 120 + "/long_name_" + "y" * 90 + ".png": b"\x89PNG" * 300,  # needs prefix / pax / GNU longname
    "__index__": b"meta",
    "empty.txt": b"",
    "uni/caf\u00e9.jpg": b"z" * 513,
}


def _tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes tarfile write pax headers
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_every_format_like_tarfile(fmt):
    if fmt == tarfile.USTAR_FORMAT:
        files = {k: v for k, v in FILES.items() if len(k) < 100 and k.isascii()}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
    else:
        files, raw = FILES, _tar(fmt)
    expected = [(k, v) for k, v in files.items() if k != "__index__"]
    assert list(tar_members(io.BytesIO(raw))) == expected
    assert list(tar_members(io.BytesIO(gzip.compress(raw)))) == expected


def test_truncated_and_garbage_archives_raise_naming_the_member():
    raw = _tar(tarfile.PAX_FORMAT)
    with pytest.raises(TarError, match="truncated tar"):
        list(tar_members(io.BytesIO(raw[:1700])))
    with pytest.raises(TarError, match="not a tar file"):
        list(tar_members(io.BytesIO(b"GIF89a" + b"\0" * 2000)))
    flipped = bytearray(raw)
    flipped[3] ^= 0xFF  # corrupt the first header's name: checksum no longer matches
    with pytest.raises(TarError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(flipped))))
