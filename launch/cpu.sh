#!/usr/bin/env bash
# N real CPU processes over gloo (DDP): `launch/cpu.sh N -m normscale.train <overrides>`.
# `accelerate launch --cpu --num_processes N` silently starts ONE process (accelerate fans out on CPU only via
# MPI); this is the form that works (INFRA.md). Port 0 lets concurrent launches pick free ports.
# `python -m normscale.cli launch-cpu` runs accelerate's launcher in its own process (exec'ed: signals reach it as
# they would reach `accelerate launch`) after validating the config once (a bad one: one line, exit 2, no worker
# started; NORMSCALE_CHECKED=1 skips this where the caller validated), and ends with rank 0's exit code (2, 3, 75,
# 130: docs/RELIABILITY.md) without the launcher's ChildFailedError traceback.
set -euo pipefail
nproc=${1:?usage: launch/cpu.sh NUM_PROCESSES -m normscale.train <overrides>}
shift
exec "${PYTHON:-python}" -m normscale.cli launch-cpu "$nproc" "$@"
