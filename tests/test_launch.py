"""launch/*.yaml read by accelerate's own config classes; `dtl launch` for a faked 2-node Slurm job."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from conftest import PROCESSES, REPO
from dtl.cluster_launch import LaunchError, expand_hostlist

pytestmark = PROCESSES  # multi-process: one such test at a time (conftest)

CONFIGS = sorted((REPO / "launch").glob("*.yaml"))
EXPECTED = {  # file -> (distributed type, processes, mixed precision)
    "cpu.yaml": (DistributedType.NO, 1, "no"),
    "cpu_2proc_gloo.yaml": (DistributedType.MULTI_GPU, 2, "no"),
    "one_gpu.yaml": (DistributedType.NO, 1, "bf16"),
    "node_ddp_bf16.yaml": (DistributedType.MULTI_GPU, 8, "bf16"),
    "multi_node_ddp_bf16.yaml": (DistributedType.MULTI_GPU, 16, "bf16"),
    "fsdp_vit.yaml": (DistributedType.FSDP, 8, "bf16"),
}


def test_every_launch_config_is_documented_here():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_loads_and_validates_with_accelerate(path, monkeypatch):
    cfg = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    kind, procs, precision = EXPECTED[path.name]
    assert (cfg.distributed_type, cfg.num_processes, str(cfg.mixed_precision)) == (kind, procs, precision)
    # what `accelerate launch --config_file PATH dtl/train.py` does with it, up to starting processes
    args = launch_command_parser().parse_args(["--config_file", str(path), "dtl/train.py", "--config", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == procs and args.mixed_precision == precision
    if kind in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == precision
        if kind == DistributedType.FSDP:  # accelerate's FSDP plugin reads its settings from this env
            for key, value in env.items():
                if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
                    monkeypatch.setenv(key, value)
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["Block"]
            assert plugin.reshard_after_forward and plugin.state_dict_type.name == "SHARDED_STATE_DICT"


def test_hostlist_expansion():
    assert expand_hostlist("gpu[01-03,7],cpu-a1,n[8-10]x") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu-a1",
                                                             "n8x", "n9x", "n10x"]
    assert expand_hostlist("rack[1-2]-node[01-02],login") == ["rack1-node01", "rack1-node02", "rack2-node01",
                                                              "rack2-node02", "login"]
    with pytest.raises(LaunchError, match=r"range '3-1'"):
        expand_hostlist("a[3-1]")


def _dry_run(env: dict, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    return subprocess.run([sys.executable, "-m", "dtl.cli", "launch", "--dry-run", *args], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_each_nodes_command_for_a_two_node_job():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_NODEID": "1"}
    r = _dry_run(env, "--", "--config", "configs/quickstart.yaml", "optim.lr=1e-3", "output_dir=runs/x y")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in lines] == ["gpu-07", "gpu-08"]
    for rank, line in enumerate(lines):
        cmd = shlex.split(line.split("] ", 1)[1])
        assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        opts = dict(zip(cmd[3:-5:2], cmd[4:-5:2]))
        assert opts == {"--config_file": str(REPO / "launch" / "multi_node_ddp_bf16.yaml"), "--num_machines": "2",
                        "--machine_rank": str(rank), "--main_process_ip": "gpu-07",
                        "--main_process_port": str(20000 + 4242), "--num_processes": "8"}
        assert cmd[-5:] == [str(REPO / "dtl" / "train.py"), "--config", "configs/quickstart.yaml",
                            "optim.lr=1e-3", "output_dir=runs/x y"]
    assert "2 node(s) x 4 process(es); rendezvous gpu-07:24242" in r.stdout


def test_dry_run_single_node_and_bad_environments():
    r = _dry_run({"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "8"}, "--", "--config", "configs/quickstart.yaml")
    assert "node_ddp_bf16.yaml" in r.stdout and "--num_processes 8" in r.stdout
    assert "--machine_rank" not in r.stdout
    r = _dry_run({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "3"}, "--", "--config", "c.yaml")
    assert r.returncode == 2 and "SLURM_NNODES=3" in r.stderr
    r = _dry_run({}, "-a", "launch/nope.yaml", "--", "--config", "c.yaml")
    assert r.returncode == 2 and "launch/nope.yaml not found" in r.stderr
    r = _dry_run({})
    assert r.returncode == 2 and "nothing to train" in r.stderr
    r = _dry_run({"SLURM_JOB_NODELIST": "gpu[a-b]"}, "--", "--config", "c.yaml")
    assert r.returncode == 2 and "cannot read the node list 'gpu[a-b]'" in r.stderr
    # what the job would train is checked too, and a bad number in the environment is named (was: tracebacks)
    quick = ("--", "--config", "configs/quickstart.yaml")
    for env, args, said in (({}, ("--", "--config", "c.yaml"), "config file not found: c.yaml"),
                            ({}, (*quick, "optim.lrr=1"), "optim.lrr: unknown key (did you mean 'optim.lr'?)"),
                            ({}, (*quick, "--confg", "x"), "does not take --confg"),
                            ({"SLURM_GPUS_ON_NODE": "abc"}, quick, "SLURM_GPUS_ON_NODE='abc': not an integer"),
                            ({"MASTER_PORT": "abc"}, quick, "MASTER_PORT='abc': not an integer"),
                            ({}, ("-a", "pyproject.toml", *quick), "pyproject.toml: not valid YAML")):
        r = _dry_run(env, *args)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])


@pytest.mark.timeout(300)
def test_two_node_launch_on_one_machine_forms_one_group(tmp_path, shard_dir):
    """What slurm/multi_node.sbatch runs on each node, for real: two `dtl launch` (node 0 and 1 of a
    faked 2-node job on this machine) with launch/multi_node_ddp_bf16.yaml meet at the c10d
    rendezvous and train as one 2-process group."""
    from conftest import tiny_config, write_config

    config = write_config(tmp_path / "mn.yaml", tiny_config(tmp_path, shard_dir, epochs=2))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    port = 20000 + os.getpid() % 20000
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dtl.cli", "launch", "--procs-per-node", "1", "--", "--config", str(config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**base, "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2", "SLURM_NODEID": str(rank),
             "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}) for rank in (0, 1)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "--machine_rank 0" in logs[0] and "--machine_rank 1" in logs[1]
    assert "2 process(es) on cpu" in logs[0] and "mixed precision bf16" in logs[0]
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"test/samples": 15' in summary  # every test sample once across the two "nodes"
    # `dtl eval` under a launcher: one gloo group, each rank its share, one report (it ran once per process)
    ev = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(port + 1), "-m", "dtl.cli", "eval",
                         str(tmp_path / "run" / "model.safetensors"), "--data", str(shard_dir), "--out",
                         str(tmp_path / "ev"), "--num-workers", "0"], cwd=REPO, capture_output=True, text=True,
                        env={**base, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert ev.returncode == 0 and ev.stdout.count("test: acc") == 1, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["samples"] == 15
