"""Seeds for everything random: generators derived from a seed and keys (case id, variant index, ...).

Library code never seeds or advances global RNGs; it takes generators made here from the command's ``--seed``
(a call that gets none uses seed 0 with its own keys, never an unseeded source).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def _seed_from(seed: int, keys: tuple) -> int:
    """A 64-bit integer derived from ``(seed, *keys)`` (SHA-256 of their repr): stable across runs and machines."""
    digest = hashlib.sha256(repr((seed,) + tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch generator seeded from ``seed`` and any keys (e.g. case id, variant index): stable across runs.

    The samplers draw noise on the generator's device and move it, so one seed gives the same lesion whether the
    network runs on the CPU or a GPU."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_seed_from(seed, keys) & ((1 << 63) - 1))
    return g


def seeded_rng(seed: int, *keys: object) -> np.random.Generator:
    """A numpy generator seeded from ``seed`` and keys, matching :func:`seeded_generator`'s derivation."""
    return np.random.default_rng(_seed_from(seed, keys))
