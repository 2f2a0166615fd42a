"""Where DataLoader workers come from: a forkserver that imports torch and dtl once, started as
early as the trainer can, so its imports overlap the trainer's own.

Light on purpose (no torch): `dtl/train.py` starts the server before its own heavy imports. On an
H100 machine the server's imports took about 10 s, and a server started only at setup left the
first epoch waiting that long for its first batch.
"""
from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.context
import signal
from typing import Optional, Sequence

# The signals Slurm and `timeout` send the whole job: the server and the workers ignore them.
STOP_SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n)]  # no SIGUSR1 on Windows

# What dtl/train.py imports, not dtl.train itself: a worker re-runs the trainer's main module
# (`python -m dtl.train` too), and runpy warns when that module was imported before it.
# dtl.worker_server_signals makes the server ignore SIGTERM/SIGUSR1; only the server imports it.
SERVER_PRELOAD = ("dtl.worker_server_signals", "torch", "PIL.Image", "dtl.shard_stream", "dtl.run_setup",
                  "dtl.run_finish", "dtl.linear_probe", "dtl.training_epoch")


def worker_context(method: str) -> Optional[multiprocessing.context.BaseContext]:
    """How DataLoader workers start. 'forkserver' (the default, as in Python 3.14) forks each
    worker from a small single-threaded server: a plain fork of the training process, which has
    threads (W&B, tqdm, a previous loader's queue feeders), can deadlock the child in CPython's
    after-fork cleanup; seen here as a hung 2-rank run. The server imports torch and dtl once."""
    if method not in multiprocessing.get_all_start_methods():
        return None                                   # e.g. forkserver on Windows: the platform's default
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(SERVER_PRELOAD))  # no effect once running
    return ctx


def start_worker_server(method: str, num_workers: int) -> None:
    """Start the forkserver now (a no-op once it runs), so that it imports torch and dtl while the
    trainer does other work instead of when the first loader starts."""
    if num_workers and method == "forkserver" and worker_context(method) is not None:  # sets the preload
        from multiprocessing import forkserver
        forkserver.ensure_running()


def start_for_command_line(argv: Sequence[str]) -> None:
    """Start the server for the run `argv` describes (dtl/train.py's arguments), before the trainer
    imports torch. Any problem with the arguments is left to the trainer, which reports it."""
    if {"-h", "--help"} & set(argv):
        return
    from dtl.run_config import load_config  # light: yaml, omegaconf, pydantic

    p = _Quiet(add_help=False)
    p.add_argument("--config", "-c")
    p.add_argument("overrides", nargs="*")
    try:
        args, _ = p.parse_known_args(list(argv))
        data = load_config(args.config, args.overrides).data
    except Exception:  # noqa: BLE001 - the trainer parses again and says what is wrong, once
        return
    start_worker_server(data.worker_start, data.num_workers)


class _Quiet(argparse.ArgumentParser):
    """A parser that raises instead of printing usage and exiting: the trainer's own parser reports."""

    def error(self, message: str):
        raise ValueError(message)
