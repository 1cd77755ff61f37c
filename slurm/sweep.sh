#!/usr/bin/env bash
# A sweep as a SLURM job array: `sbatch slurm/sweep.sh experiment=<name> [overrides, -m style a=1,2]` from the
# checkout's root. Submitted like that it is a small planning job: `python -m normscale.sweep plan --submit` freezes
# the points to a manifest, skips finished ones, and submits this script again as the array (chunked under
# MaxArraySize, throttled, requeueable, with a warning signal before the time limit). As array task i it trains
# point offset + i of the manifest (under `accelerate launch` when the task has several GPUs); on the warning
# signal the run saves its resume state, the task requeues itself, and the requeued task resumes the same run.
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
log="$(dirname "$NORMSCALE_SWEEP_MANIFEST")/logs/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.out"
mapfile -t point < <("$NORMSCALE_PYTHON" -m normscale.sweep point --manifest "$NORMSCALE_SWEEP_MANIFEST" --index "$index")
gpus=${SLURM_GPUS_ON_NODE:-0}
if (( gpus > 1 )); then
  launcher=("$NORMSCALE_PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" --main_process_port 0)
else
  launcher=("$NORMSCALE_PYTHON")
fi
echo "normscale: sweep point $index (job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}, restart ${SLURM_RESTART_COUNT:-0}): ${point[*]}"

preempted=0
trap 'preempted=1; kill -USR1 "$child" 2>/dev/null || true' USR1
"${launcher[@]}" -m normscale.train "${point[@]}" &
child=$!
status=0
while true; do  # a trapped signal interrupts `wait`; wait again until the run has exited
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
if (( preempted )) && (( status == 0 )); then
  echo "normscale: sweep point $index saved its resume state on the warning signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if (( status != 0 )); then
  echo "normscale: error: sweep point $index (${point[*]}) failed with exit code $status; log: $log" >&2
fi
exit "$status"
