# Sourced by normscale's sbatch scripts: the checkout, its Python, and the site settings of slurm/site.env
# (exported, the environment winning, and mirrored into the SBATCH_* variables that nested sbatch calls read).
# Under sbatch a script runs from a spool copy, so the checkout is NORMSCALE_ROOT (slurm/submit sets it) or the
# submission directory.
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
[[ -z "${NORMSCALE_SETTINGS_ONLY:-}" ]] || return 0  # slurm/submit needs only the settings
cd "$NORMSCALE_ROOT"

# Set `launcher` to a command that, followed by `-m MODULE ARGS...`, runs the module under accelerate launch on every
# task of the allocation (one task per machine): machine rank SLURM_PROCID, SLURM_NTASKS machines, the first node as
# rendezvous (loopback when all tasks share one node), GPUS processes per machine (SLURM_GPUS_ON_NODE, else
# NORMSCALE_GPUS_PER_NODE; 0: one CPU process over gloo). The launchers ignore USR1 (see train_requeueable). With
# --quiet a failed worker ends the launcher with exit 1 and its summary, without the launcher's own traceback.
machine_launcher() {
  local nodes gpus
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export NS_MACHINES=$SLURM_NTASKS
  export NS_MAIN=$(head -n1 <<< "$nodes")
  [[ $(wc -l <<< "$nodes") == 1 ]] && NS_MAIN=127.0.0.1
  export NS_PORT=${NORMSCALE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  gpus=${SLURM_GPUS_ON_NODE:-$NORMSCALE_GPUS_PER_NODE}
  if [[ -z "${SLURM_GPUS_ON_NODE:-}" ]] && (( gpus > 0 )); then
    echo "normscale: warning: no GPUs allocated (SLURM_GPUS_ON_NODE unset); starting NORMSCALE_GPUS_PER_NODE=$gpus" \
      "processes per machine anyway: submit with slurm/submit or --gpus-per-node" >&2
  fi
  if (( gpus > 0 )); then
    export NS_PER_MACHINE=$gpus NS_LAUNCH_ARGS="--quiet --config_file ${NORMSCALE_ACCELERATE_CONFIG:-launch/multinode.yaml}"
  else
    export NS_PER_MACHINE=1 ACCELERATE_USE_CPU=1 NS_LAUNCH_ARGS="--quiet --multi_gpu --mixed_precision no --dynamo_backend no"
  fi
  echo "normscale: $NS_MACHINES machine(s) x $NS_PER_MACHINE process(es), rendezvous $NS_MAIN:$NS_PORT"
  # shellcheck disable=SC2016  # expanded by each task's shell, with its own SLURM_PROCID
  launcher=(srun --kill-on-bad-exit=1 bash -c 'trap "" USR1
    exec "$NORMSCALE_PYTHON" -m accelerate.commands.launch $NS_LAUNCH_ARGS --num_machines "$NS_MACHINES" \
      --num_processes $((NS_MACHINES * NS_PER_MACHINE)) --machine_rank "$SLURM_PROCID" \
      --main_process_ip "$NS_MAIN" --main_process_port "$NS_PORT" "$@"' bash)
}

# The run's resume step, max_steps and directory (`--manifest M --task I`: summed over the runs of a pack task); a config
# that does not validate: one line, exit 2.
progress() { "$NORMSCALE_PYTHON" -m normscale.sweep progress "$@"; }

# check ENTRY OVERRIDES...: validate a command's config once, before any process of it starts (one line, exit 2).
check() { "$NORMSCALE_PYTHON" -m normscale.cli check "$@"; }

# train_requeueable FORWARD OVERRIDES...: `"${launcher[@]}" -m normscale.train OVERRIDES...`, requeued when preempted.
# train_requeueable FORWARD --pack MANIFEST I: the same for array task I of a packed sweep manifest, `"${launcher[@]}"
# -m normscale.sweep train-pack --manifest MANIFEST --index I` (each of its packs in one process), its progress summed
# over their runs.
# The config is validated once, by the first `progress` (a bad one: its one line, and the function returns 2 before
# anything starts); the launched command is told so (NORMSCALE_CHECKED=1: launch/cpu.sh does not check again).
# The launched command ignores USR1 (a launcher such as torch elastic's would die of it; normscale.train installs
# its own handler). Once this script gets USR1 (the warning signal, --signal=B:USR1@...; by hand
# `scancel --signal=USR1 --batch JOB`), `FORWARD PID` passes it on every 2 s until the run exits (a process still
# starting up ignores it, so it is sent again). The job is requeued when the run saved resume state short of
# max_steps, whatever the launcher's exit code; else the function returns the run's exit status.
train_requeueable() {
  local forward=$1 before after max run_dir child status checked what command
  shift
  if [[ ${1:-} == --pack ]]; then
    what=(--manifest "$2" --task "$3") command=(-m normscale.sweep train-pack --manifest "$2" --index "$3")
  else
    what=("$@") command=(-m normscale.train "$@")
  fi
  checked=$(progress "${what[@]}") || return $?
  read -r before max run_dir <<< "$checked"
  preempted=0
  trap 'preempted=1' USR1
  (trap '' USR1; export NORMSCALE_CHECKED=1; exec "${launcher[@]}" "${command[@]}") &
  child=$!
  while kill -0 "$child" 2>/dev/null; do
    if (( preempted )); then "$forward" "$child"; sleep 2; else sleep 1; fi
  done
  wait "$child" && status=0 || status=$?
  trap - USR1
  (( preempted )) || return "$status"
  read -r after max run_dir < <(progress "${what[@]}" || echo "-1 -1 ?")
  if (( after > before && after < max )); then
    echo "normscale: preempted; resume state saved at step $after of $max ($run_dir); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  (( after == max )) && return 0
  echo "normscale: error: preempted, and the run saved no resume state (step $before -> $after, exit code $status)" >&2
  return $(( status ? status : 1 ))
}

# FORWARD for a run started in this script: the run's process (one process) and its children (the workers of an
# accelerate/torch elastic launcher, each in a session of its own).
signal_run() { kill -USR1 "$1" 2>/dev/null || true; pkill -USR1 -P "$1" || true; }
# FORWARD for a run started by srun: every process of the job's steps on every node (not this batch script).
signal_steps() { scancel --signal=USR1 "$SLURM_JOB_ID" || true; }
