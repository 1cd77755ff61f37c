#!/usr/bin/env bash
# One run on several nodes: `slurm/submit --nodes=N slurm/train_multinode.sh <overrides>` from the checkout's root
# (slurm/submit adds partition, account, time, --gpus-per-node, --requeue and the warning signal from slurm/site.env).
# srun starts one task per node (machine); each runs `accelerate launch` with its machine rank (SLURM_PROCID), the
# number of machines (SLURM_NTASKS) and the first node of the allocation as the rendezvous, all from SLURM.
# SLURM_GPUS_ON_NODE (else NORMSCALE_GPUS_PER_NODE) processes per machine with launch/multinode.yaml (DDP; set
# NORMSCALE_ACCELERATE_CONFIG=launch/fsdp.yaml or zero3.yaml to shard); 0 GPUs: one CPU process per machine over gloo.
# On the warning signal (USR1 to this script) every rank gets USR1, all ranks agree to stop at the same step and save
# the resume state, and the job requeues itself; the requeued job resumes the run.
#SBATCH --job-name=ns-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%j-multinode.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail
source "${NORMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"

echo "normscale: multi-node run (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}): $*"
machine_launcher
train_requeueable signal_steps "$@"
