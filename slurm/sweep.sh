#!/usr/bin/env bash
# A sweep as a SLURM job array: `slurm/submit slurm/sweep.sh experiment=<name> [overrides, -m style a=1,2]` (or plain
# sbatch) from the checkout's root. Submitted like that it is a small planning job: `python -m normscale.sweep plan
# --submit` freezes the points to a manifest, skips finished ones, and submits this script again as the array
# (chunked under MaxArraySize, throttled, requeueable, with a warning signal before the time limit). As array task i
# it trains point offset + i of the manifest: one process, or under `accelerate launch` with one process per GPU
# when the task has several (NORMSCALE_PROCESSES_PER_TASK > 1 without GPUs: CPU processes over gloo). With pack=N > 1
# the manifest also lists the packs the unfinished points form (runs of one shape, at most N each) and array task i
# (NORMSCALE_SWEEP_PACKS=1) trains its packs (`python -m normscale.sweep train-pack`), one process each: one pack, or
# one per GPU of the task (NORMSCALE_PROCESSES_PER_TASK overrides), each run into its own run directory. On the
# warning signal the run (every run of the packs) saves its resume state, the task requeues itself, and the requeued
# task resumes the same run(s).
# The planning job validates every point (`sweep plan`: one line, exit 2, nothing submitted); an array task validates
# its point (every point of its pack) once before it starts training (train_requeueable in common.sh).
#SBATCH --job-name=ns-sweep-plan
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=slurm-%j-sweep-plan.out
set -euo pipefail
source "${NORMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"

if [[ -z "${NORMSCALE_SWEEP_MANIFEST:-}" || -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  exec "$NORMSCALE_PYTHON" -m normscale.sweep plan --submit "$@"
fi

index=$((NORMSCALE_SWEEP_OFFSET + SLURM_ARRAY_TASK_ID))
log=${NORMSCALE_SWEEP_LOG//%A/$SLURM_ARRAY_JOB_ID}  # sbatch's --output pattern (normscale.layout.sweep_log)
log=${log//%a/$SLURM_ARRAY_TASK_ID}
if [[ -n "${NORMSCALE_SWEEP_PACKS:-}" ]]; then  # task i trains its packs, one process each (normscale.sweep)
  what="pack task $index" args=(--pack "$NORMSCALE_SWEEP_MANIFEST" "$index") launcher=("$NORMSCALE_PYTHON")
  echo "normscale: sweep pack task $index (job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}," \
    "restart ${SLURM_RESTART_COUNT:-0})"
else
  mapfile -t args < <("$NORMSCALE_PYTHON" -m normscale.sweep point --manifest "$NORMSCALE_SWEEP_MANIFEST" --index "$index")
  what="point $index (${args[*]})"
  gpus=${SLURM_GPUS_ON_NODE:-0}
  procs=${NORMSCALE_PROCESSES_PER_TASK:-$(( gpus > 1 ? gpus : 1 ))}
  if (( procs > 1 && gpus > 0 )); then
    launcher=("$NORMSCALE_PYTHON" -m accelerate.commands.launch --quiet --multi_gpu --num_processes "$procs"
              --main_process_port 0)
  elif (( procs > 1 )); then
    launcher=(env PYTHON="$NORMSCALE_PYTHON" bash launch/cpu.sh "$procs")
  else
    launcher=("$NORMSCALE_PYTHON")
  fi
  echo "normscale: sweep point $index (job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}," \
    "restart ${SLURM_RESTART_COUNT:-0}, $procs process(es)): ${args[*]}"
fi
train_requeueable signal_run "${args[@]}" && status=0 || status=$?
if (( status != 0 )); then
  echo "normscale: error: sweep $what failed with exit code $status; log: $log" >&2
fi
exit "$status"
