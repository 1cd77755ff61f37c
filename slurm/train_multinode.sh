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

export NS_MACHINES=$SLURM_NTASKS
export NS_MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
[[ "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | wc -l)" == 1 ]] && NS_MAIN=127.0.0.1  # all tasks on one node
export NS_PORT=${NORMSCALE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
if (( NORMSCALE_GPUS_PER_NODE > 0 )); then
  export NS_PER_MACHINE=$NORMSCALE_GPUS_PER_NODE
  export NS_LAUNCH_ARGS="--config_file ${NORMSCALE_ACCELERATE_CONFIG:-launch/multinode.yaml}"
else
  export NS_PER_MACHINE=1 ACCELERATE_USE_CPU=1 NS_LAUNCH_ARGS="--multi_gpu --mixed_precision no --dynamo_backend no"
fi
echo "normscale: $NS_MACHINES machine(s) x $NS_PER_MACHINE process(es), rendezvous $NS_MAIN:$NS_PORT"
# shellcheck disable=SC2016  # expanded by each task's shell, with its own SLURM_PROCID
srun --kill-on-bad-exit=1 bash -c '
  exec "$NORMSCALE_PYTHON" -m accelerate.commands.launch $NS_LAUNCH_ARGS --num_machines "$NS_MACHINES" \
    --num_processes $((NS_MACHINES * NS_PER_MACHINE)) --machine_rank "$SLURM_PROCID" \
    --main_process_ip "$NS_MAIN" --main_process_port "$NS_PORT" -m normscale.train "$@"' bash "$@"
