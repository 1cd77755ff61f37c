#!/usr/bin/env bash
# A pretrained LLM on an experiment's urn sequences, its weights sharded over every GPU of the allocation
# (model_kwargs.sharding=fsdp: each rank holds 1/world of the weights and scores its share of the batches):
#   70B on 1 node x 8 GPUs:   slurm/submit --nodes=1 --gpus-per-node=8 slurm/llm_eval.sh experiment=llm_eval \
#                               model_kwargs.model_path=meta-llama/Llama-3.1-70B
#   70B on 2 nodes x 4 GPUs:  slurm/submit --nodes=2 --gpus-per-node=4 slurm/llm_eval.sh experiment=llm_eval \
#                               model_kwargs.model_path=meta-llama/Llama-3.1-70B
# --gpus-per-node sets the processes per node (SLURM_GPUS_ON_NODE); without it slurm/submit asks for
# NORMSCALE_GPUS_PER_NODE (slurm/site.env), as it adds partition, account, time and memory. One srun task per node
# runs `accelerate launch` (machine_launcher in slurm/common.sh). The hub cache (HF_HOME) must be on storage every
# node reads.
#SBATCH --job-name=ns-llm-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%j-llm-eval.out
set -euo pipefail
source "${NORMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/common.sh"
args=("$@")
[[ " ${args[*]} " == *" model_kwargs.sharding="* ]] || args+=("model_kwargs.sharding=fsdp")
check normscale.eval "${args[@]}"  # once, before any process starts: a bad config or model path is one line, exit 2
export NORMSCALE_CHECKED=1
machine_launcher
"${launcher[@]}" -m normscale.eval "${args[@]}"
