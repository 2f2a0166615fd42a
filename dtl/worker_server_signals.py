"""Imported by the DataLoader worker server (forkserver) alone, never by the trainer: it makes the
server ignore the stop signals, as the workers it forks do.

Slurm (scancel, time limit, preemption) and `timeout` signal every process of the job, and the
server is one of them. Killed between two loaders (say, after the last training step of an epoch,
before validation starts its workers), it leaves the trainer unable to start the next loader
while it is finishing the pass it checkpoints after. Ignoring the signals is safe: the server
exits on its own when the trainer's end of its pipe closes, however the trainer ends.
"""
import signal

for _name in ("SIGTERM", "SIGUSR1"):  # no SIGUSR1 on Windows (nor a forkserver)
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), signal.SIG_IGN)
