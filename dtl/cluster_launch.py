"""The `accelerate launch` command for each node of a Slurm job, run here or printed (dry run).

One Slurm task per node runs `dtl launch -- --config X key=value ...`; it reads the job's node
list, its own node id and the GPUs it was given, and execs

    accelerate launch --config_file launch/<...>.yaml --num_machines N --machine_rank R
        --num_processes N*P --main_process_ip <first node> --main_process_port <port>
        dtl/train.py --config X key=value ...

so every node agrees on the rendezvous without a hand-written hostfile. `--dry-run` prints the
command of every node instead (works anywhere: the Slurm variables may be faked).

SIGUSR1 is set to ignored before the exec: the launcher and torchrun's agent then survive the
preemption signal Slurm sends to the whole step, and only the training processes (which install
their own handler, dtl/preemption.py) act on it - checkpoint, exit, requeue.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import yaml

from dtl.user_errors import DtlError

REPO = Path(__file__).resolve().parent.parent
LAUNCH_DIR = REPO / "launch"
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


class LaunchError(DtlError, RuntimeError):
    """The Slurm environment or the launch arguments do not describe a runnable job."""


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed node list -> host names: `gpu[01-03,7],cpu-a1` -> gpu01 gpu02 gpu03 gpu7 cpu-a1;
    several ranges in one name multiply out: `rack[1-2]-n[01-02]` -> rack1-n01 rack1-n02 rack2-n01 rack2-n02."""
    names, depth, start = [], 0, 0
    for i, c in enumerate(spec + ","):  # split on the commas outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            if spec[start:i]:
                names.append(spec[start:i])
            start = i + 1
    hosts = [h for name in names for h in _expand_name(name, spec)]
    if not hosts or depth:
        raise LaunchError(f"cannot read the node list {spec!r}")
    return hosts


def _expand_name(name: str, spec: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    out: list[str] = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not (lo.isdigit() and (hi or lo).isdigit()) or int(hi or lo) < int(lo):
            raise LaunchError(f"cannot read the node list {spec!r} (range {part!r})")
        for i in range(int(lo), int(hi or lo) + 1):
            out += _expand_name(f"{name[:m.start()]}{i:0{len(lo)}d}{name[m.end():]}", spec)
    return out


def _int(value, where: str) -> int:
    """An integer from the Slurm environment or an accelerate config, or one line naming where."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{where}={value!r}: not an integer") from None


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs Slurm gave this node (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES), else what CUDA sees."""
    if env.get("SLURM_GPUS_ON_NODE"):  # set only when GPUs were allocated, unlike the request SLURM_GPUS_PER_NODE
        return _int(env["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE")
    if env.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
        return len(env["CUDA_VISIBLE_DEVICES"].split(","))
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


@dataclass
class JobLayout:
    nodes: list[str]
    procs_per_node: int
    main_ip: str
    port: Optional[int]  # None: the accelerate config's (0 there = any free port, single node only)

    @property
    def num_processes(self) -> int:
        return len(self.nodes) * self.procs_per_node


def job_nodes(env: Mapping[str, str]) -> list[str]:
    """Host names of the job's nodes (this host alone outside Slurm)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nodes = expand_hostlist(nodelist) if nodelist else [env.get("HOSTNAME", "localhost")]
    if env.get("SLURM_NNODES") and _int(env["SLURM_NNODES"], "SLURM_NNODES") != len(nodes):
        raise LaunchError(f"SLURM_NNODES={env['SLURM_NNODES']} but the node list {nodelist!r} names {len(nodes)}")
    return nodes


def job_layout(env: Mapping[str, str], accelerate_config: dict, procs_per_node: Optional[int] = None,
               port: Optional[int] = None) -> JobLayout:
    """Nodes, processes per node and rendezvous address of the current (or faked) Slurm job."""
    nodes = job_nodes(env)
    if procs_per_node is None:
        gpus = gpus_per_node(env)
        procs_per_node = gpus if gpus > 0 else _int(accelerate_config.get("num_processes", 1), "num_processes") // max(
            1, _int(accelerate_config.get("num_machines", 1), "num_machines"))
    if procs_per_node < 1:
        raise LaunchError("no GPUs on this node and no --procs-per-node: nothing to launch")
    if port is None and env.get("MASTER_PORT"):
        port = _int(env["MASTER_PORT"], "MASTER_PORT")
    if port is None and len(nodes) > 1:  # every node must compute the same one; jobs sharing a node differ
        port = 20000 + _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 20000
    main_ip = env.get("MASTER_ADDR") or nodes[0]
    return JobLayout(nodes, procs_per_node, main_ip, port)


def default_accelerate_config(num_nodes: int, env: Mapping[str, str]) -> Path:
    if num_nodes > 1:
        return LAUNCH_DIR / "multi_node_ddp_bf16.yaml"
    gpus = gpus_per_node(env)
    return LAUNCH_DIR / ("node_ddp_bf16.yaml" if gpus > 1 else "one_gpu.yaml" if gpus == 1 else "cpu.yaml")


def node_command(layout: JobLayout, node_rank: int, accelerate_config: Path, train_args: list[str]) -> list[str]:
    # the accelerate of this Python, whatever PATH the Slurm task got
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    if len(layout.nodes) > 1:
        cmd += ["--num_machines", str(len(layout.nodes)), "--machine_rank", str(node_rank),
                "--main_process_ip", layout.main_ip, "--main_process_port", str(layout.port)]
    elif layout.port is not None and layout.num_processes > 1:
        cmd += ["--main_process_port", str(layout.port)]
    cmd += ["--num_processes", str(layout.num_processes), str(TRAIN_SCRIPT), *train_args]
    return cmd


def _read_accelerate_config(path: Path) -> dict:
    if not path.is_file():
        raise LaunchError(f"accelerate config {path} not found (see launch/*.yaml)")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LaunchError(f"accelerate config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, dict):
        raise LaunchError(f"accelerate config {path}: top level must be a mapping, got {type(loaded).__name__}")
    for key in ("num_processes", "num_machines"):
        if key in loaded:
            _int(loaded[key], f"accelerate config {path}: {key}")
    return loaded


def _check_train_args(train_args: list[str]) -> None:
    """Validate dtl/train.py's arguments (its config and overrides) as the training would."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c")
    p.add_argument("overrides", nargs="*")
    if {"-h", "--help"} & set(train_args):
        return  # dtl/train.py prints its help
    known, unknown = p.parse_known_args(train_args)
    if unknown:
        raise LaunchError(f"dtl/train.py does not take {' '.join(unknown)} (it takes --config FILE and key=value)")
    from dtl.run_config import load_config

    load_config(known.config, known.overrides)


def main(argv: Optional[list[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dtl launch", description=__doc__.split("\n\n")[0],
                                usage="dtl launch [options] -- --config CONFIG [key=value ...]")
    p.add_argument("--accelerate-config", "-a", type=Path,
                   help="launch/*.yaml (default: multi_node_ddp_bf16 on several nodes, node_ddp_bf16 with "
                        "several GPUs, one_gpu, else cpu)")
    p.add_argument("--procs-per-node", type=int, help="default: the node's GPUs, else the config's num_processes")
    p.add_argument("--port", type=int, help="rendezvous port (default: MASTER_PORT, else 20000 + job id %% 20000)")
    p.add_argument("--dry-run", action="store_true", help="print the command every node would run, and exit")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then dtl/train.py's arguments")
    args = p.parse_args(argv)
    env = os.environ if env is None else env
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        if not train_args:
            raise LaunchError("nothing to train: give dtl/train.py's arguments after --")
        acc_path = args.accelerate_config or default_accelerate_config(len(job_nodes(env)), env)
        layout = job_layout(env, _read_accelerate_config(acc_path), args.procs_per_node, args.port)
        _check_train_args(train_args)  # a bad config fails here once, not on every node's every rank
        if args.dry_run:
            print(f"# {len(layout.nodes)} node(s) x {layout.procs_per_node} process(es); rendezvous "
                  f"{layout.main_ip}:{layout.port or 'any free port'}")
            for rank, host in enumerate(layout.nodes):
                print(f"[{host}] {shlex.join(node_command(layout, rank, acc_path, train_args))}")
            return 0
        if len(layout.nodes) > 1 and "SLURM_NODEID" not in env:
            raise LaunchError("a multi-node job must run this once per node inside `srun --ntasks-per-node=1`")
        cmd = node_command(layout, _int(env.get("SLURM_NODEID", "0"), "SLURM_NODEID"), acc_path, train_args)
    except DtlError as e:
        print(f"dtl launch: error: {e}", file=sys.stderr)
        return 2
    print(f"dtl launch [{env.get('SLURMD_NODENAME', layout.nodes[0])}]: {shlex.join(cmd)}", flush=True)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited through exec: see the module docstring
    os.execvp(cmd[0], cmd)
    return 0  # not reached
