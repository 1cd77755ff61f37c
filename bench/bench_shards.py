"""Shard reading: batches/s the loader delivers against what a training step consumes, in one run.

Compared, on the canonical balls-and-urns data (V=8, C=128, batch 64) and default linear regression (d=8, C=32,
batch 128):
  normscale   ShardReader.batch(step): whole-shard reads, sha256-verified, read ahead on a thread, to torch
  baseline    what a user would otherwise write: the same batches in one HDF5 file with h5py's defaults
              (contiguous, uncompressed), indexed per step (f[name][step]), to torch
  generate    data_kwargs.source=generate on this CPU (the on-device stream; shown for reference)
  train step  a stand-in consumer: a 1-layer pre-LN transformer, hidden 64, forward + backward + AdamW on CPU
              (normscale's own model arrives with training; on a GPU a step is faster, so the ratio there is lower)

    .venv/bin/python bench/bench_shards.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normscale import settings  # noqa: E402
from normscale.cli import CONF_DIR, to_config  # noqa: E402
from normscale.data import GeneratedBatches, ShardReader, load_task_pools, prepare_data  # noqa: E402
from normscale.data.store import format_bytes, plan_data, to_torch  # noqa: E402


def config_for(cache_dir: Path, setting: str, steps: int):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose("config", overrides=[f"setting={setting}", f"cache_dir={cache_dir}", "name=bench",
                                                      f"training_kwargs.max_steps={steps}"]))


def rate(fetch, steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        fetch(step)
    return steps / (time.perf_counter() - start)


def naive_reader(directory: Path, setting, path: Path):
    """Copy the shards into one default-layout HDF5 file, then read it the plain way: f[name][step]."""
    parts = {}
    for shard in sorted((directory / "train").glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            for name in f:
                parts.setdefault(name, []).append(f[name][()])
    with h5py.File(path, "w") as out:
        for name, arrays in parts.items():
            out[name] = np.concatenate(arrays)
    f = h5py.File(path, "r")
    return lambda step: to_torch({n: f[n][step] for n in f}, setting)


def train_step_rate(setting: str, batch: dict, repeats: int = 30) -> float:
    torch.manual_seed(0)
    width, layer = 64, torch.nn.TransformerEncoderLayer(64, 1, 256, dropout=0.0, batch_first=True, norm_first=True)
    if setting == "balls_and_urns":
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        read_in, read_out = torch.nn.Embedding(int(inputs.max()) + 1, width), torch.nn.Linear(width, int(inputs.max()))
    else:
        inputs, targets = batch["xs"], batch["ys"]
        read_in, read_out = torch.nn.Linear(inputs.shape[-1], width), torch.nn.Linear(width, 1)
    modules = torch.nn.ModuleList([read_in, layer, read_out])
    optimizer = torch.optim.AdamW(modules.parameters(), lr=5e-4)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(inputs.shape[1])

    def step(_):
        out = read_out(layer(read_in(inputs), src_mask=mask, is_causal=True))
        if setting == "balls_and_urns":
            loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
        else:
            loss = torch.nn.functional.mse_loss(out.squeeze(-1), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step(0)
    return rate(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=3, help="shards of data to read per setting")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'setting':<18} {'batch':>9} {'normscale b/s':>14} {'naive h5py b/s':>15} {'generate b/s':>13} "
          f"{'train step/s':>13} {'normscale/naive':>16} {'normscale/step':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("balls_and_urns", "linear_regression"):
            probe = config_for(Path(tmp), setting, 100)
            steps = args.shards * plan_data(probe).steps_per_shard
            config = config_for(Path(tmp), setting, steps)
            prepared = prepare_data(config)
            directory = prepared.plan.directory
            setting_obj = settings.get(setting, config.task_kwargs)
            ours = rate(ShardReader(directory, setting_obj).batch, steps)
            naive = rate(naive_reader(directory, setting_obj, Path(tmp) / f"{setting}-naive.h5"), steps)
            generated = rate(GeneratedBatches(config, load_task_pools(directory)["train"]).batch, min(steps, 2000))
            consumer = train_step_rate(setting, ShardReader(directory, setting_obj).batch(0))
            print(f"{setting:<18} {format_bytes(prepared.plan.bytes_per_step):>9} {ours:>14.0f} {naive:>15.0f} "
                  f"{generated:>13.0f} {consumer:>13.1f} {ours / naive:>15.1f}x {ours / consumer:>14.0f}x")


if __name__ == "__main__":
    main()
