#!/usr/bin/env python
"""Inspect an experiment's data directory: manifest, files, arrays, and one step's batch. No torch import.

    python tools/inspect_shards.py ${CACHE_DIR}/experiments/balls_and_urns/demo/data/<dataset> [--step 0]
"""
import argparse
import json
from pathlib import Path

import h5py

from normscale.layout import DATA_MANIFEST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help=f"a dataset directory (it holds {DATA_MANIFEST})")
    parser.add_argument("--step", type=int, default=0, help="training step whose batch to print")
    args = parser.parse_args()
    manifest_path = args.directory / DATA_MANIFEST
    if not manifest_path.exists():
        parser.error(f"{manifest_path} does not exist: pass a dataset directory under .../data/")
    manifest = json.loads(manifest_path.read_text())
    print(json.dumps(manifest["spec"], indent=1, sort_keys=True))
    for name, entry in sorted(manifest["files"].items()):
        arrays = ", ".join(f"{a} {tuple(i['shape'])} {i['dtype']}" for a, i in entry["arrays"].items())
        print(f"{name:<24} {entry['bytes']:>12,} B  sha256 {entry['sha256'][:12]}  {arrays}")
    per_shard = manifest["steps_per_shard"]
    shard = args.directory / f"train/shard-{args.step // per_shard:05d}.h5"
    if shard.exists():
        with h5py.File(shard, "r") as f:
            print(f"step {args.step} (row {args.step % per_shard} of {shard.name}):")
            for name in f:
                print(f"  {name}: {f[name][args.step % per_shard]}")


if __name__ == "__main__":
    main()
