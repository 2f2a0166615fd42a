"""Opening shards far away: retries with backoff and jitter that keep every sample exactly once.

A remote shard (http(s)://, or a `pipe:` command such as `pipe:aws s3 cp s3://b/x.tar -` or
`pipe:gsutil cat gs://b/x.tar`) can fail part-way: a dropped connection, a 5xx/429 answer, a
server that stalls, a stream that ends early. Here such a failure is retried with exponential
backoff and jitter, up to `retries` attempts and `max_seconds` in all; the retry re-reads the
shard and skips (without decoding) the samples already delivered, so the consumer sees every
sample of the shard once, in order, as if nothing had happened. http(s) is read with urllib and a
per-read timeout, so a server that hangs raises instead of hanging the job. A 4xx other than
408/425/429 is not transient and fails at once. When the retries are spent, one line names the
URL, the attempts and how far the shard got. Local files are never retried: a truncated local
shard is damaged, not unlucky.

Every retry is appended to `log` (one JSON line: url, attempt, error, samples delivered), which
the run sums into `data/shard_retries` in metrics.jsonl.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional

from dtl.dataset_index import DataError
from dtl.tar_members import TarError

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class RetryPolicy:
    retries: int = 5               # attempts after the first
    max_seconds: float = 300.0     # give up when retrying has taken this long
    read_timeout: float = 60.0     # http(s): seconds any single connect or read may take
    base_delay: float = 0.5        # first backoff; doubles per attempt (x0.5..1.5 jitter), at most 30 s
    log: Optional[str] = None      # JSON lines, one per retry


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
    while True:
        try:
            stream = open_url(url, policy.read_timeout)
            try:
                seen = 0
                for sample in parse(stream, url):
                    seen += 1
                    if seen <= delivered:
                        continue  # delivered before the failure: skipped, not decoded
                    delivered += 1
                    yield sample
            finally:
                try:
                    stream.close()
                except Exception:  # a pipe that failed reports it on close; the read already said so
                    pass
            return
        except Exception as e:
            if not is_remote(url) or not transient(e):
                raise
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
