# Sourced by slurm/*.sbatch. dtl_train CONFIG [key=value ...] runs dtl/train.py on every node of
# the job (one `dtl launch` per node, which execs `accelerate launch` with the job's rendezvous),
# forwards Slurm's early warning (SIGUSR1, from --signal=B:USR1@120) to the training processes,
# and keeps the run directory fixed across requeues so the restarted job resumes by itself.
#
# Environment knobs: DTL_ACCELERATE_CONFIG (a launch/*.yaml; default chosen by `dtl launch`),
# DTL_PROCS_PER_NODE (default: the node's GPUs), DTL_RUNS (folder of the run directories,
# default runs; each job writes DTL_RUNS/JOBNAME-JOBID), DTL_PYTHON (default: python on PATH).
set -euo pipefail

if [ ! -f dtl/train.py ]; then
  echo "dtl: submit from the dtl repository root (sbatch slurm/...): $(pwd) has no dtl/train.py" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1

dtl_job_id() {  # stable across requeues; array tasks are JOBID_TASK
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; else echo "$SLURM_JOB_ID"; fi
}

dtl_forward_usr1() {
  echo "dtl: $(date '+%F %T') batch shell got SIGUSR1 (time limit or preemption ahead): the training checkpoints and requeues"
  scancel --signal=USR1 "$SLURM_JOB_ID"  # every step on every node, not this shell
}

dtl_train() {
  local config=${1:?usage: sbatch slurm/SCRIPT.sbatch CONFIG [key=value ...]}
  shift
  local run_dir=${DTL_RUNS:-runs}/${SLURM_JOB_NAME}-$(dtl_job_id)
  local launch_args=()
  [ -n "${DTL_ACCELERATE_CONFIG:-}" ] && launch_args+=(--accelerate-config "$DTL_ACCELERATE_CONFIG")
  [ -n "${DTL_PROCS_PER_NODE:-}" ] && launch_args+=(--procs-per-node "$DTL_PROCS_PER_NODE")
  local srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1)
  # srun does not inherit the job's --cpus-per-task (Slurm >= 22.05): without it the data loader
  # workers of a node would share one core where Slurm binds CPUs
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  echo "dtl: job $(dtl_job_id) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST} ($(date '+%F %T')): $config -> $run_dir"
  trap dtl_forward_usr1 USR1
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4 (RHEL 7 login nodes)
  srun "${srun_args[@]}" "${DTL_PYTHON:-python}" -m dtl.cli launch ${launch_args[@]+"${launch_args[@]}"} -- \
    --config "$config" "output_dir=$run_dir" "$@" &
  local pid=$! rc=0
  while true; do  # a trapped signal interrupts `wait`; keep waiting for the step itself
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  echo "dtl: job $(dtl_job_id) step ended with exit code $rc ($(date '+%F %T'))"
  return "$rc"
}
