"""Named, independent random streams derived from the run's seed (DESIGN: data and init seeds are separate,
OOD tasks come from their own stream). A stream is addressed by (seed, name, index...) and hashed, so any
step's batch or any round of constant_freq can be drawn without drawing what comes before it."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def stream_seed(seed: int, *path) -> int:
    """A 63-bit seed for the stream (seed, *path): stable across processes, machines and Python versions."""
    text = "/".join(str(p) for p in (seed, *path))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def numpy_generator(seed: int, *path) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(stream_seed(seed, *path)))


def torch_generator(seed: int, *path, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *path))
