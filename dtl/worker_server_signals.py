"""Imported by the DataLoader worker server (forkserver) alone, never by the trainer: it makes the
server ignore the stop signals, as the workers it forks do.

Slurm (scancel, time limit, preemption) and `timeout` signal every process of the job, and the
server is one of them. Killed as a loader is starting its workers (validation right after the last
training step of an epoch), it takes that loader down while the trainer is finishing the pass it
checkpoints after. Ignoring the signals is safe: the server exits when every holder of its
keep-alive pipe is gone, and the workers close theirs as they start
(`shard_stream._release_worker_server`), so it goes with the trainer however the trainer ends.
"""
import signal

for _name in ("SIGTERM", "SIGUSR1"):  # no SIGUSR1 on Windows (nor a forkserver)
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), signal.SIG_IGN)
