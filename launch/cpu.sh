#!/usr/bin/env bash
# N real CPU processes over gloo (DDP): `launch/cpu.sh N -m normscale.train <overrides>`.
# `accelerate launch --cpu --num_processes N` silently starts ONE process (accelerate fans out on CPU only via
# MPI); this is the form that works (INFRA.md). Port 0 lets concurrent launches pick free ports.
set -euo pipefail
nproc=${1:?usage: launch/cpu.sh NUM_PROCESSES -m normscale.train <overrides>}
shift
ACCELERATE_USE_CPU=1 exec "${PYTHON:-python}" -m accelerate.commands.launch --multi_gpu --num_processes "$nproc" \
  --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 0 "$@"
