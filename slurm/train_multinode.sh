#!/usr/bin/env bash
# One run on several nodes: `sbatch [--nodes=N] slurm/train_multinode.sh <overrides>` from the checkout's root.
# srun starts one task per node (machine); each runs `accelerate launch` with its machine rank (SLURM_PROCID), the
# number of machines (SLURM_NTASKS) and the first node of the allocation as the rendezvous, all from SLURM.
# NORMSCALE_GPUS_PER_NODE (slurm/site.env) processes per machine with launch/multinode.yaml (DDP; set
# NORMSCALE_ACCELERATE_CONFIG=launch/fsdp.yaml or zero3.yaml to shard); 0 GPUs: one CPU process per machine over gloo.
# At the time limit SLURM sends SIGTERM: every rank saves the resume state and exits; resubmit to resume.
#SBATCH --job-name=ns-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%j-multinode.out
set -euo pipefail
source "${NORMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"

launch_on_every_machine normscale.train "$@"
