"""Independent random streams derived from one seed, by purpose and coordinates.

Every component asks for its own generator (e.g. ("pretrain", round, user)),
so adding a component or reordering calls never shifts anyone else's draws.
"""

from __future__ import annotations

import hashlib

import torch


def derive(seed: int, *path: object) -> int:
    digest = hashlib.sha256(repr((seed, *path)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *path: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive(seed, *path))
