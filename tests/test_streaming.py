"""The stream across real processes and transports: torchrun ranks x workers, HTTP shards."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from conftest import CLASSES, PROCESSES, blank_image, encode, make_image, tiny_config
from dtl.shard_writer import index_shards

HERE = Path(__file__).parent
SIZES = [3, 11, 5, 8, 2, 13, 6]  # 7 shards of uneven sizes, 48 samples


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uneven")
    n = 0
    for split, sizes in (("train", SIZES), ("test", [4, 7, 2])):
        for i, size in enumerate(sizes):
            with wds.TarWriter(str(root / f"{split}-{i}.tar")) as sink:
                for _ in range(size):
                    sink.write({"__key__": f"{split}{n:04d}", "jpg": encode(make_image(n % 3, n, size=16)),
                                "cls": n % 3})
                    n += 1
    index_shards(root, {"train": "train-{0..6}.tar", "test": "test-{0..2}.tar"}, CLASSES)
    return root


@PROCESSES  # torchrun ranks: one multi-process test at a time (conftest)
@pytest.mark.timeout(300)
def test_two_ranks_two_workers_equal_steps_exactly_once(uneven_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29700 + os.getpid() % 200), str(HERE / "ddp_stream.py"),
                        str(uneven_shards), str(tmp_path)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"stream{i}.json").read_text()) for i in range(2)]
    for epoch in ("0", "1"):
        train = [rk[f"train/{epoch}"] for rk in ranks]
        assert train[0]["steps"] == train[1]["steps"] == train[0]["expected_steps"] > 0
        seen = Counter(i for t in train for i in t["ids"])
        assert max(seen.values()) == 1                           # never twice in an epoch
        assert 48 - sum(seen.values()) < 2 * 2 * 3                # documented drop < ranks x workers x batch
        test = Counter(i for rk in ranks for i in rk[f"test/{epoch}"]["ids"])
        assert sorted(test) == [f"test{n:04d}" for n in range(48, 61)] and max(test.values()) == 1
    assert ranks[0]["train/0"]["ids"] != ranks[0]["train/1"]["ids"]  # reshuffled per epoch


def test_fewer_shards_than_slots_without_counts_warns_and_stays_exact(uneven_shards):

    from dtl.shard_stream import ShardStream, SplitSource, StreamOptions, make_loader

    urls = [str(uneven_shards / f"train-{i}.tar") for i in range(3)]  # 3 shards, 2 ranks x 2 workers
    seen = Counter()
    for rank in range(2):
        with pytest.warns(UserWarning, match="3 shards for 4 rank x worker slots"):
            s = ShardStream(SplitSource("train", urls, None, sum(SIZES[:3])), blank_image,
                            StreamOptions(classes=CLASSES, train=True), rank, 2, num_workers=2)
        seen.update(k for b in make_loader(s, 1, 2) for k in b["key"])
    assert max(seen.values()) == 1 and sum(seen.values()) == 4 * (sum(SIZES[:3]) // 4)



def test_workers_start_from_a_forkserver_and_deliver_what_fork_delivers(uneven_shards):
    """forkserver is the default (a plain fork of a trainer with threads can hang in the child);
    the start method changes nothing about which samples arrive in which order."""
    from dtl.shard_stream import ShardStream, SplitSource, StreamOptions, make_loader

    urls = [str(uneven_shards / f"train-{i}.tar") for i in range(7)]
    s = ShardStream(SplitSource("train", urls, SIZES, sum(SIZES)), blank_image,
                    StreamOptions(classes=CLASSES, train=True), 0, 1, num_workers=2)
    s.set_epoch(1)
    default = make_loader(s, 3, 2)
    assert default.multiprocessing_context.get_start_method() == "forkserver"
    ids = {m: [k for b in make_loader(s, 3, 2, m) for k in b["key"]] for m in ("forkserver", "fork")}
    assert ids["forkserver"] == ids["fork"] and len(ids["fork"]) == 2 * (sum(SIZES) // 2 // 3 * 3)


_SIGNAL_THE_SERVER = """
import os, signal, sys
from multiprocessing import forkserver
sys.path.insert(0, sys.argv[2])
from conftest import CLASSES, blank_image
from dtl.shard_stream import ShardStream, SplitSource, StreamOptions, make_loader, start_worker_server
start_worker_server("forkserver", 2)
s = ShardStream(SplitSource("test", [f"{sys.argv[1]}/test-{i}.tar" for i in range(3)], [4, 7, 2], 13), blank_image,
                StreamOptions(classes=CLASSES, train=False), 0, 1, num_workers=2)
before = sorted(k for b in make_loader(s, 2, 2) for k in b["key"])
server = forkserver._forkserver._forkserver_pid
for _ in range(5):  # the signal lands as the next loader starts its workers
    os.kill(server, signal.SIGTERM)  # as `timeout` or scancel signal the job
    assert sorted(k for b in make_loader(s, 2, 2) for k in b["key"]) == before
assert forkserver._forkserver._forkserver_pid == server  # never killed (a dead one would be restarted)
print(len(before), "ok")
"""


@pytest.mark.timeout(120)
def test_the_worker_server_outlives_a_sigterm_so_the_next_loader_starts(uneven_shards):
    """Slurm and `timeout` signal every process of the job, the forkserver among them; the trainer
    finishes its pass before it checkpoints, and that pass may start a new loader (validation)."""
    r = subprocess.run([sys.executable, "-c", _SIGNAL_THE_SERVER, str(uneven_shards), str(HERE)],
                       capture_output=True, text=True, timeout=100, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.split() == ["13", "ok"], r.stderr[-3000:]


_OPEN_LOADER_THEN_WAIT = """
import os, sys, time
from multiprocessing import forkserver
sys.path.insert(0, sys.argv[2])
from conftest import CLASSES, blank_image
from dtl.shard_stream import ShardStream, SplitSource, StreamOptions, make_loader, start_worker_server
start_worker_server("forkserver", 2)
s = ShardStream(SplitSource("test", [f"{sys.argv[1]}/test-{i}.tar" for i in range(3)], [4, 7, 2], 13), blank_image,
                StreamOptions(classes=CLASSES, train=False), 0, 1, num_workers=2)
it = iter(make_loader(s, 1, 2))
next(it)
print(forkserver._forkserver._forkserver_pid, *(w.pid for w in it._workers), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits for its reaper only
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_trainer_leaves_no_worker_server_or_workers_behind(uneven_shards):
    """SIGKILL (or the OOM killer) gives the trainer no chance to close its loaders: the server and
    the workers of an open loader must still go, not keep each other alive."""
    proc = subprocess.Popen([sys.executable, "-c", _OPEN_LOADER_THEN_WAIT, str(uneven_shards), str(HERE)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    proc.kill()
    proc.wait()
    deadline = time.time() + 30  # PyTorch's worker watchdog looks every 5 s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"still running after the trainer's SIGKILL: {left} (server first)"


@contextlib.contextmanager
def http_server(root: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(300)
def test_trains_from_shards_served_over_http(shard_dir, tmp_path):
    from dtl.run_config import Config
    from dtl.train import train

    with http_server(shard_dir) as url:
        cfg = tiny_config(tmp_path, shard_dir, epochs=1, **{"data.root": url})
        summary = train(Config.model_validate(cfg)).summary
    assert summary["test/samples"] == 15 and summary["steps"] > 0


def _worker_pids(loader) -> set[int]:
    return {w.pid for w in loader._iterator._workers}


def test_training_and_validation_loaders_keep_their_workers_and_follow_the_epoch(shard_dir, tmp_path):
    """Persistent workers read the epoch, batch size and resume skip that set_epoch writes into the
    stream's shared state: every epoch (after an abandoned one too, and on a resume skip) delivers
    exactly what a fresh loader of that epoch delivers, from the same worker processes."""
    import copy

    from dtl.data_pipeline import build_data
    from dtl.run_config import Config
    from dtl.shard_stream import make_loader

    cfg = Config.model_validate(tiny_config(tmp_path, shard_dir, **{"data.num_workers": 2, "data.batch_size": 3}))
    pre = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    data = build_data(cfg, pre, CLASSES, 0, 1, None)

    def fresh(epoch: int, skip: int = 0) -> list[str]:
        s = copy.copy(data.train)
        s.set_epoch(epoch, skip_batches=skip, batch_size=3)
        return [k for b in make_loader(s, 3, 2) for k in b["key"]]

    def kept(epoch: int, skip: int = 0) -> list[str]:
        data.train.set_epoch(epoch, skip_batches=skip, batch_size=3)
        return [k for b in data.loader(data.train) for k in b["key"]]

    loader = data.loader(data.train)
    assert kept(0) == fresh(0)
    pids = _worker_pids(loader)
    assert kept(1) == fresh(1) and kept(1) != kept(0)
    data.train.set_epoch(2, batch_size=3)
    next(iter(data.loader(data.train)))            # an epoch abandoned after one batch (a stop, max_steps)
    assert kept(3) == fresh(3)
    assert kept(4, skip=3) == fresh(4, skip=3) == fresh(4)[9:]   # a resumed epoch skips what was delivered
    assert data.loader(data.train) is loader and _worker_pids(loader) == pids
    val = [k for b in data.loader(data.val) for k in b["key"]]
    assert sorted(val) == sorted(k for b in data.loader(data.val) for k in b["key"]) and len(val) == len(set(val))
    assert data.loader(data.val) is data.loader(data.val) and data.loader(data.test) is not data.loader(data.test)
    data.close()
    assert _gone(pids)


def _gone(pids: set[int], within: float = 10.0) -> bool:
    """True once none of `pids` runs (gone, or a zombie its parent, the worker server, has yet to reap)."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.time() + within
    while any(running(p) for p in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


_EARLY = """
import sys
from multiprocessing import forkserver
from dtl.worker_server import start_for_command_line
start_for_command_line(sys.argv[1:])
print(forkserver._forkserver._forkserver_pid is not None, "torch" in sys.modules)
"""


def test_the_trainer_script_starts_the_worker_server_before_importing_torch(tmp_path, shard_dir):
    """dtl/train.py starts the server for its run first thing, so the server's imports (10 s on an H100
    machine) overlap the trainer's: the first batch came 3.3 s into the first epoch on this CPU, now 0.2 s.
    Only when the run's loaders will use it, and without importing torch here; bad arguments are left
    to the trainer to report."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path, shard_dir, **{"data.num_workers": 2})))

    def started(*argv: str) -> bool:
        r = subprocess.run([sys.executable, "-c", _EARLY, *argv], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parent.parent)
        assert r.returncode == 0, r.stderr[-2000:]
        server, torch_imported = r.stdout.split()
        assert torch_imported == "False"
        return server == "True"

    assert started("--config", str(cfg))
    assert not started("--config", str(cfg), "data.num_workers=0")
    assert not started("--config", str(cfg), "data.worker_start=spawn")
    assert not started("--config", str(tmp_path / "missing.yaml"))
    assert not started("--config", str(cfg), "data.num_workers=lots")
