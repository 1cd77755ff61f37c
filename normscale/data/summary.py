"""`python -m normscale.data`: plan, generate or verify (repairing exactly the damaged files), and summarise an
experiment's data."""
from __future__ import annotations

import h5py
import numpy as np

from normscale.config import Config
from normscale.data.priors import task_prior_weights
from normscale.data.store import (PreparedData, check_budget, extend_eval_set, format_bytes, plan_data, prepare_data,
                                  read_manifest)


def prepare_and_summarise(config: Config) -> PreparedData:
    plan = plan_data(config)
    t = config.task_kwargs
    shards = (f"{plan.num_shards} shard(s) of {plan.steps_per_shard} steps, {format_bytes(plan.train_bytes)} "
              f"uncompressed ({format_bytes(plan.bytes_per_step)} per batch)"
              if config.data_kwargs.source == "shards" else "none stored: source=generate makes each batch on the device")
    print(f"normscale data: setting={config.setting} name={config.name} seed={config.seed}\n"
          f"  dataset     {plan.directory}\n"
          f"  tasks       D={t.num_tasks} ({t.prior} prior), {t.num_ood_tasks} OOD tasks, dims={t.num_dims}, "
          f"context={t.context_length}\n"
          f"  needs       train: {config.training_kwargs.max_steps} steps x {config.training_kwargs.batch_size} "
          f"sequences: {shards}; eval: {format_bytes(plan.eval_bytes)}", flush=True)
    check_budget(config, plan)
    prepared = prepare_data(config, verify=True)  # regenerates exactly the missing or damaged files
    eval_sequences = config.eval_kwargs.batch_size * config.eval_kwargs.num_eval_batches
    prepared.generated += extend_eval_set(plan.directory, eval_sequences)  # the eval blocks evaluation will read
    prepared.manifest = read_manifest(plan.directory)
    for name, what in prepared.repaired.items():
        print(f"  repaired    {plan.directory / name}: {what}")
    files = prepared.manifest["files"]
    on_disk = sum(files[n]["bytes"] for n in files)
    repaired = f"{len(prepared.repaired)} repaired, " if prepared.repaired else ""
    print(f"  files       {len(prepared.generated)} generated, {repaired}{len(prepared.verified)} verified against the "
          f"manifest; {len(files)} files, {format_bytes(on_disk)} on disk")
    with h5py.File(plan.directory / "eval.h5", "r") as f:
        for split in f:
            print(f"  eval/{split:<6} {len(f[split]['task_ids'])} sequences, content hash {f[split].attrs['content_hash'][:16]}")
    blocks = sum(n.startswith("eval/") for n in files)
    if blocks:
        print(f"  eval blocks 1..{blocks} saved after block 0 (eval.h5), {config.data_kwargs.eval_size} sequences per "
              f"split each; this config's evaluation reads the first {eval_sequences}")
    if config.data_kwargs.source == "shards":
        with h5py.File(plan.directory / plan.shard_name(0), "r") as f:
            ids = f["task_ids"][()].ravel()
        expected = task_prior_weights(t.prior, t.num_tasks, t.prior_exponent)
        observed = np.bincount(ids, minlength=t.num_tasks) / len(ids)
        print(f"  shard 0     {len(ids)} sequences; task frequency vs prior: max |observed - expected| = "
              f"{np.abs(observed - expected).max():.4f} (task 0: {observed[0]:.4f} vs {expected[0]:.4f})")
    return prepared
