# Sourced by normscale's sbatch scripts: the checkout, its Python, and the site settings of slurm/site.env
# (exported, the environment winning, and mirrored into the SBATCH_* variables that nested sbatch calls read).
# Under sbatch a script runs from a spool copy, so the checkout is NORMSCALE_ROOT or the submission directory.
NORMSCALE_ROOT=${NORMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [[ ! -f "$NORMSCALE_ROOT/slurm/site.env" ]]; then
  echo "normscale: error: $NORMSCALE_ROOT is not a normscale checkout: submit from the checkout's root or set NORMSCALE_ROOT" >&2
  exit 2
fi
export NORMSCALE_ROOT
while IFS='=' read -r key value; do
  [[ "$key" =~ ^NORMSCALE_[A-Z_]+$ ]] || continue
  [[ -n "${!key+set}" ]] || export "$key=$value"
done < "$NORMSCALE_ROOT/slurm/site.env"
if [[ -n "${NORMSCALE_PARTITION:-}" ]]; then export SBATCH_PARTITION=$NORMSCALE_PARTITION; fi
if [[ -n "${NORMSCALE_ACCOUNT:-}" ]]; then export SBATCH_ACCOUNT=$NORMSCALE_ACCOUNT; fi
if [[ -z "${NORMSCALE_PYTHON:-}" ]]; then
  NORMSCALE_PYTHON=python
  [[ -x "$NORMSCALE_ROOT/.venv/bin/python" ]] && NORMSCALE_PYTHON=$NORMSCALE_ROOT/.venv/bin/python
fi
export NORMSCALE_PYTHON
cd "$NORMSCALE_ROOT"

# Run `python -m MODULE ARGS...` under accelerate launch on every task of the allocation (one task per machine):
# machine rank SLURM_PROCID, SLURM_NTASKS machines, the first node as rendezvous (loopback when all tasks share one
# node), GPUS processes per machine (SLURM_GPUS_ON_NODE, else NORMSCALE_GPUS_PER_NODE; 0: one CPU process over gloo).
launch_on_every_machine() {
  local module=$1; shift
  local nodes gpus
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export NS_MACHINES=$SLURM_NTASKS NS_MODULE=$module
  export NS_MAIN=$(head -n1 <<< "$nodes")
  [[ $(wc -l <<< "$nodes") == 1 ]] && NS_MAIN=127.0.0.1
  export NS_PORT=${NORMSCALE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  gpus=${SLURM_GPUS_ON_NODE:-$NORMSCALE_GPUS_PER_NODE}
  if (( gpus > 0 )); then
    export NS_PER_MACHINE=$gpus NS_LAUNCH_ARGS="--config_file ${NORMSCALE_ACCELERATE_CONFIG:-launch/multinode.yaml}"
  else
    export NS_PER_MACHINE=1 ACCELERATE_USE_CPU=1 NS_LAUNCH_ARGS="--multi_gpu --mixed_precision no --dynamo_backend no"
  fi
  echo "normscale: $NS_MACHINES machine(s) x $NS_PER_MACHINE process(es), rendezvous $NS_MAIN:$NS_PORT"
  # shellcheck disable=SC2016  # expanded by each task's shell, with its own SLURM_PROCID
  srun --kill-on-bad-exit=1 bash -c '
    exec "$NORMSCALE_PYTHON" -m accelerate.commands.launch $NS_LAUNCH_ARGS --num_machines "$NS_MACHINES" \
      --num_processes $((NS_MACHINES * NS_PER_MACHINE)) --machine_rank "$SLURM_PROCID" \
      --main_process_ip "$NS_MAIN" --main_process_port "$NS_PORT" -m "$NS_MODULE" "$@"' bash "$@"
}
