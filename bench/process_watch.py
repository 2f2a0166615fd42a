"""Run a bench's command as a child process: every output line timestamped, peak RSS sampled."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


class ProcessWatch:
    """Runs a command to its end, times every output line as it arrives and samples the RSS of the
    process tree (shared pages count once per process, so the sum is an upper bound)."""

    def __init__(self, cmd: list[str], log: Path, env: dict, cwd: Path):
        self.lines: list[tuple[float, str]] = []
        self.peak_rss = 0
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=cwd)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        with open(log, "w") as f:
            for line in self.proc.stdout:
                self.lines.append((time.time() - self.start, line.rstrip()))
                f.write(line)
        self.rc = self.proc.wait()
        self.wall = time.time() - self.start

    def _sample(self) -> None:
        p = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                rss = sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(0.5)
