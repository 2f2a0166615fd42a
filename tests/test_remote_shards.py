"""Shards over HTTP from a flaky server of the test's own: dropped connections, 503s and a stall are
retried, the run ends exactly as one that read the shards from disk, and the retries are counted."""
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROCESSES, tiny_config
from dtl.run_config import Config
from dtl.shard_fetch import RetryPolicy, ShardFetchError, read_with_retries
from dtl.shard_stream import group_members
from dtl.tar_members import tar_members
from dtl.train import train


class Flaky(SimpleHTTPRequestHandler):
    """Serves a folder; `faults` maps a file name to the misbehaviours of its first requests."""
    faults: dict = {}
    seen: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        n = self.seen[name] = self.seen.get(name, 0) + 1
        plan = self.faults.get(name, [])
        fault = plan[n - 1] if n <= len(plan) else None
        if fault == "503":
            self.send_error(503, "busy")
            return
        if fault in ("drop", "stall"):
            data = open(self.translate_path(self.path), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault == "stall":
                time.sleep(3)            # past the client's 1 s read timeout
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def server(shard_dir):
    handler = type("Handler", (Flaky,), {"faults": {}, "seen": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(shard_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_flaky_server_costs_nothing_but_retries(tmp_path, shard_dir, server):
    handler, url = server
    shards = sorted(p.name for p in shard_dir.glob("train-*.tar"))
    handler.faults.update({"dataset.json": ["503"], shards[0]: ["drop", "drop"], shards[1]: ["503", "stall"],
                           shards[-1]: ["drop"]})
    remote = tiny_config(tmp_path / "remote", shard_dir, epochs=2, report=False,
                         **{"data.root": url, "data.read_timeout_s": 1.0, "data.num_workers": 2})
    local = tiny_config(tmp_path / "local", shard_dir, epochs=2, report=False, **{"data.num_workers": 2})
    train(Config.model_validate(remote))
    train(Config.model_validate(local))
    a = load_file(str(tmp_path / "remote" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "local" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # the same samples, in the same order, each once
    rows = [json.loads(line) for line in (tmp_path / "remote" / "run" / "metrics.jsonl").read_text().splitlines()]
    retries = [r["data/shard_retries"] for r in rows if "train/acc" in r]
    assert retries and retries[-1] >= 5      # 2 drops + 503 + stall + drop of the training shards
    logged = [json.loads(line) for p in (tmp_path / "remote" / "run").glob("shard_retries.rank*.jsonl")
              for line in p.read_text().splitlines()]
    kinds = {e["error"].split(":")[0] for e in logged}
    assert {"HTTPError", "TimeoutError", "TarError"} <= kinds, kinds      # 503, the stall, the cut-off streams
    assert any(e["delivered"] > 0 for e in logged)                          # resumed mid-shard, nothing repeated


def test_spent_retries_are_one_line_naming_the_shard(server, shard_dir):
    handler, url = server
    name = sorted(p.name for p in shard_dir.glob("train-*.tar"))[0]
    handler.faults[name] = ["503"] * 10
    with pytest.raises(ShardFetchError, match=rf"shard {url}/{name}: gave up after 3 attempts"):
        list(read_with_retries(f"{url}/{name}", lambda s, u: group_members(tar_members(s), u),
                               RetryPolicy(retries=2, base_delay=0.01)))
    handler.faults["missing.tar"] = []
    with pytest.raises(Exception, match="404"):   # not transient: no retry
        list(read_with_retries(f"{url}/missing.tar", lambda s, u: group_members(tar_members(s), u),
                               RetryPolicy(retries=5, base_delay=0.01)))


def test_shard_cache_reads_the_network_once_and_keeps_to_its_cap(tmp_path, shard_dir, server):
    handler, url = server
    cache = tmp_path / "cache"
    cfg = tiny_config(tmp_path / "a", shard_dir, epochs=2, report=False,
                      **{"data.root": url, "data.cache_dir": str(cache)})
    train(Config.model_validate(cfg))
    tars = {k: v for k, v in handler.seen.items() if k.endswith(".tar")}
    assert tars and set(tars.values()) == {1}            # epoch 2, validation and test read the local copies
    assert len(list(cache.glob("*.tar"))) == len(tars) and not list(cache.glob(".*partial"))
    # a cap of about three shards: the least recently used go, the cache stays within it
    size = max(p.stat().st_size for p in shard_dir.glob("*.tar"))
    small = tmp_path / "small"
    cfg = tiny_config(tmp_path / "b", shard_dir, epochs=1, report=False,
                      **{"data.root": url, "data.cache_dir": str(small), "data.cache_max_gb": 3.5 * size / 2**30})
    train(Config.model_validate(cfg))
    kept = list(small.glob("*.tar"))
    assert 1 <= len(kept) < len(tars) and sum(p.stat().st_size for p in kept) <= 3.5 * size


@PROCESSES  # torchrun ranks: one multi-process test at a time (conftest)
@pytest.mark.timeout(400)
def test_two_gloo_ranks_over_a_flaky_server_end_as_from_disk(tmp_path, shard_dir, server):
    """The same under DDP: 2 torchrun processes (gloo), one worker each, against the flaky server."""
    import os
    import subprocess
    import sys

    from conftest import write_config

    handler, url = server
    shards = sorted(p.name for p in shard_dir.glob("train-*.tar"))
    handler.faults.update({shards[0]: ["drop"], shards[2]: ["503", "drop"], shards[-1]: ["stall"]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    outs = {}
    for i, (name, extra) in enumerate((("remote", {"data.root": url, "data.read_timeout_s": 1.0}), ("local", {}))):
        cfg = tiny_config(tmp_path / name, shard_dir, epochs=2, report=False,
                          **{"data.num_workers": 1, "data.batch_size": 4, **extra})
        path = write_config(tmp_path / f"{name}.yaml", cfg)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(29700 + os.getpid() % 500 + i), "-m", "dtl.train", "--config",
                            str(path)], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = load_file(str(tmp_path / name / "run" / "model.safetensors"))
    assert all(torch.equal(outs["remote"][k], outs["local"][k]) for k in outs["local"])
    logged = [line for p in (tmp_path / "remote" / "run").glob("shard_retries.rank*.jsonl")
              for line in p.read_text().splitlines()]
    assert len(logged) >= 4
