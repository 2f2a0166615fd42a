"""A real one-node Slurm cluster for the tests: Debian's munge, slurmctld and slurmd, started as root.

`start_cluster(folder)` installs the packages when they are missing (apt-get), writes a
slurm.conf into `folder` (linuxproc process tracking, no cgroups, one node with 2 CPUs), starts
the three daemons and waits until the node takes jobs. Clients find the cluster through the
SLURM_CONF variable of the returned environment. `SlurmUnavailable` says why it could not.

The node also has 8 "GPUs": a gres backed by character devices that are /dev/null, so the
slurm/ scripts' `--gpus-per-node` requests are accepted as on a GPU cluster and Slurm sets
SLURM_GPUS_ON_NODE; torch sees no CUDA there, so dtl trains on CPU processes in a gloo group.
"""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]


class SlurmUnavailable(RuntimeError):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, timeout=600)
    if r.returncode != 0:  # maybe a stale package index
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        r = _run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, timeout=600)
    if r.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_munge() -> None:
    if _run(["sh", "-c", "munge -n | unmunge"]).returncode == 0:
        return  # already running
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        _run(["runuser", "-u", "munge", "--", "mungekey", "--create"])
    r = _run(["runuser", "-u", "munge", "--", "munged"])
    if r.returncode != 0:
        raise SlurmUnavailable(f"munged did not start: {r.stderr.strip()}")


def _conf(folder: Path, host: str) -> str:
    d = folder
    return f"""ClusterName=dtltest
GresTypes=gpu
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
SlurmdTimeout=60
NodeName={host} Gres=gpu:8 NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(folder: Path) -> dict[str, str]:
    """Start munge + slurmctld + slurmd; return the environment that points clients at them."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmctld/slurmd here needs root")
    ensure_installed()
    _start_munge()
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    for i in range(8):
        dev = folder / f"fakegpu{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    (folder / "gres.conf").write_text(f"NodeName={host} Name=gpu File={folder}/fakegpu[0-7]\n")
    conf = folder / "slurm.conf"  # gres.conf is read from the same folder
    conf.write_text(_conf(folder, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    conf = conf.resolve()
    for daemon in (["slurmctld", "-c", "-f", str(conf)], ["slurmd", "-c", "-f", str(conf), "-N", host]):
        r = _run(daemon, env=env, timeout=60)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{daemon[0]} did not start: {r.stderr.strip()[-500:]}")
    deadline = time.time() + 60
    while time.time() < deadline:
        r = _run(["sinfo", "-h", "-N", "-o", "%t"], env=env, timeout=30)
        if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
            return env
        time.sleep(0.5)
    log = (folder / "slurmctld.log").read_text()[-1500:] if (folder / "slurmctld.log").exists() else ""
    raise SlurmUnavailable(f"the Slurm node did not become idle within 60 s; slurmctld.log:\n{log}")


def stop_cluster(folder: Path) -> None:
    for pidfile in ("slurmd.pid", "slurmctld.pid"):
        path = folder / pidfile
        if path.exists():
            try:
                os.kill(int(path.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
