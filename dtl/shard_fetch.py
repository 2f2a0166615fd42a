"""Opening shards far away: retries with backoff and jitter that keep every sample exactly once.

A remote shard (http(s)://, or a `pipe:` command such as `pipe:aws s3 cp s3://b/x.tar -` or
`pipe:gsutil cat gs://b/x.tar`) can fail part-way: a dropped connection, a 5xx/429 answer, a
server that stalls, a stream that ends early. Here such a failure is retried with exponential
backoff and jitter, up to `retries` times after the first attempt and `max_seconds` in all; the
retry re-reads the shard and skips (without decoding) the samples already delivered, so the
consumer sees every sample of the shard once, in order, as if nothing had happened. http(s) is
read with urllib and a per-read timeout, so a server that hangs raises instead of hanging the
job. A 4xx other than 408/425/429 is not transient and fails at once. When the retries are spent,
one line names the URL, the attempts and how far the shard got. Local files are never retried: a
truncated local shard is damaged, not unlucky.

Every retry is appended to `log` (one JSON line: url, attempt, error, samples delivered), which
the run sums into `data/shard_retries` in metrics.jsonl.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from dtl.dataset_index import DataError
from dtl.tar_members import TarError

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class ShardCache:
    """Local copies of remote shards under `root`, at most `max_bytes`, least recently used evicted.

    A shard is written while it streams in (the first epoch pays the network once) to a partial
    file private to the process and renamed into place only when the whole shard has arrived, so
    a partial file is never read; ranks of one node may share the folder (the rename is atomic,
    and two ranks that fetch the same shard write the same bytes). A read refreshes the file's
    modification time, which eviction orders by. A slot that stops before a shard's end (its range
    ends inside the shard) does not cache it; the slot that reads it to the end does."""

    def __init__(self, root: str, max_bytes: int):
        # the folder is made when the first shard streams in (`partial`), so a run refused for a bad
        # config or split leaves nothing behind; what would stop it from being made is refused now
        self.root, self.max_bytes = Path(root), max_bytes
        existing = next(p for p in (self.root.absolute(), *self.root.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise DataError(f"data.cache_dir={root}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DataError(f"data.cache_dir={root}: {existing} is not writable")

    def path(self, url: str) -> Path:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return self.root / f"{digest}-{Path(url.split('?')[0]).name or 'shard'}"

    def get(self, url: str) -> Optional[Path]:
        p = self.path(url)
        try:
            os.utime(p)
            return p
        except FileNotFoundError:
            return None

    def partial(self, url: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.path(url).with_name(f".{self.path(url).name}.{os.getpid()}.partial")

    def commit(self, tmp: Path, url: str) -> None:
        os.replace(tmp, self.path(url))
        self.evict(keep=self.path(url))

    def evict(self, keep: Optional[Path] = None) -> None:
        files = []
        for p in self.root.iterdir():  # after a commit: `partial` made the folder
            if not p.name.startswith(".") and p.is_file():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


class _Tee:
    """A stream that copies what is read into a file; `drain` reads the rest (tar padding)."""

    def __init__(self, stream: BinaryIO, out: BinaryIO):
        self.stream, self.out = stream, out

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.out.write(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


@dataclass
class RetryPolicy:
    retries: int = 5               # attempts after the first
    max_seconds: float = 300.0     # give up when retrying has taken this long
    read_timeout: float = 60.0     # http(s): seconds any single connect or read may take
    base_delay: float = 0.5        # first backoff; doubles per attempt (x0.5..1.5 jitter), at most 30 s
    log: Optional[str] = None      # JSON lines, one per retry
    cache: Optional[ShardCache] = None   # local copies of remote shards (data.cache_dir)


class ShardFetchError(DataError):
    """A remote shard that still failed after the retries."""


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


def open_url(url: str, read_timeout: float) -> BinaryIO:
    """A byte stream of `url`: urllib with a per-read timeout for http(s), webdataset's gopen otherwise."""
    if url.startswith(("http://", "https://")):
        req = urllib.request.Request(url, headers={"User-Agent": "dtl"})
        return urllib.request.urlopen(req, timeout=read_timeout)  # noqa: S310 (the user's own URL)
    import webdataset as wds

    return wds.gopen(url, "rb")


def transient(e: BaseException) -> bool:
    """Worth another try: transport trouble, a stream cut short, a 5xx/429/408 answer."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in TRANSIENT_HTTP
    return isinstance(e, (TarError, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                          TimeoutError, socket.timeout, EOFError)) or (
        isinstance(e, OSError) and not isinstance(e, FileNotFoundError))


def read_with_retries(url: str, parse: Callable[[BinaryIO, str], Iterator[dict]],
                      policy: Optional[RetryPolicy]) -> Iterator[dict]:
    """The samples `parse` reads from `url`, each once, retrying transient failures of remote URLs."""
    policy = policy or RetryPolicy()
    delivered, attempt, started = 0, 0, time.monotonic()
    jitter = random.Random()  # private: the global generators drive seeded augmentation
    cache = policy.cache if is_remote(url) else None
    while True:
        local = cache.get(url) if cache else None
        tmp = cache.partial(url) if cache and local is None else None
        try:
            stream = open_url(str(local) if local else url, policy.read_timeout)
            if tmp is not None:
                stream = _Tee(stream, open(tmp, "wb"))  # type: ignore[assignment]
            complete = False
            try:
                seen = 0
                for sample in parse(stream, url):
                    seen += 1
                    if seen <= delivered:
                        continue  # delivered before the failure: skipped, not decoded
                    delivered += 1
                    yield sample
                if tmp is not None:
                    stream.drain()
                    complete = True
            finally:
                try:
                    stream.close()
                except Exception:  # a pipe that failed reports it on close; the read already said so
                    pass
                if tmp is not None:
                    stream.out.close()
                    if complete:
                        cache.commit(tmp, url)
                    else:
                        tmp.unlink(missing_ok=True)
            return
        except Exception as e:
            if not is_remote(url) or not transient(e):
                raise
            if local is not None:  # a damaged local copy: drop it, fetch the shard again
                local.unlink(missing_ok=True)
            attempt += 1
            spent = time.monotonic() - started
            if attempt > policy.retries or spent > policy.max_seconds:
                raise ShardFetchError(f"shard {url}: gave up after {attempt} attempts in {spent:.0f} s, "
                                      f"{delivered} samples in ({type(e).__name__}: {e}); see data.retries, "
                                      f"data.retry_max_s, data.read_timeout_s") from None
            delay = min(30.0, policy.base_delay * 2 ** (attempt - 1)) * jitter.uniform(0.5, 1.5)
            if policy.log:
                with open(policy.log, "a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), "url": url, "attempt": attempt,
                                        "error": f"{type(e).__name__}: {e}", "delivered": delivered,
                                        "delay_s": round(delay, 3)}) + "\n")
            time.sleep(delay)


def read_bytes(url: str, policy: Optional[RetryPolicy] = None) -> bytes:
    """The whole of a small remote file (dataset.json), with the same retries."""
    def whole(stream: BinaryIO, _url: str) -> Iterator[dict]:
        yield {"data": stream.read()}
    return next(read_with_retries(url, whole, policy))["data"]
