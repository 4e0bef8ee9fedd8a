"""The server: user selection and θ_G ← θ_G + Σ α_i δ_i, with boosted updates."""
from __future__ import annotations

import torch

from fedmeta.model import Params


def select(candidates: list[int], per_round: int, min_updates: int, g: torch.Generator) -> list[int]:
    """Pick M_r users at random; the first M_min to answer (a random order) are the ones applied."""
    order = torch.randperm(len(candidates), generator=g)[:per_round].tolist()
    return [candidates[i] for i in order[:min_updates]]


def update(local: Params, theta: Params, boost: float = 1.0) -> Params:
    """δ = λ(θ_local − θ_G); λ = 1 for benign users, λ > 1 for a boosting attacker."""
    return {k: boost * (local[k] - theta[k]) for k in theta}


def weights(sizes: list[int], weighting: str) -> list[float]:
    """α_i: uniform (1/M_min) or proportional to each user's dataset size."""
    if weighting == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    total = sum(sizes)
    return [s / total for s in sizes]


def aggregate(theta: Params, deltas: list[Params], alphas: list[float]) -> Params:
    return {k: theta[k] + sum(a * d[k] for a, d in zip(alphas, deltas)) for k in theta}
