"""The server: user selection, boosted updates, and how θ_G ← θ_G + aggregate(δ_1, …, δ_n) combines them.

`mean` is the paper's rule, Σ α_i δ_i. The other aggregators are Experiment 4's server-side defenses
(docs/experiment4.md names each one's source and hyperparameters); Flower's strategy helpers and
scikit-learn's HDBSCAN do their arithmetic. `aggregate` takes plain δ_i (or, under secure aggregation,
masked uploads), so any engine that collects updates can call it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedmeta import secure
from fedmeta.config import Federation
from fedmeta.errors import FedmetaError
from fedmeta.model import Theta

NORM_MARGIN = 0.99  # an adaptive attacker's update ends this fraction of the bound below it: "just under"


def select(candidates: list[int], per_round: int, min_updates: int, g: torch.Generator) -> list[int]:
    """Pick M_r users at random; the first M_min to answer (a random order) are the ones applied."""
    order = torch.randperm(len(candidates), generator=g)[:per_round].tolist()
    return [candidates[i] for i in order[:min_updates]]


def update(local: Theta, theta: Theta) -> Theta:
    """A benign user's δ = θ_local − θ_G (the attacker boosts its own: `attack.boosted_update`)."""
    return {k: local[k] - theta[k] for k in theta}


def finite(theta: Theta) -> bool:
    """Whether every weight is finite: one reduction per tensor, one synchronisation in all."""
    return bool(torch.stack([torch.isfinite(v).all() for v in theta.values()]).all())


class RejectedUpdate(FedmetaError):
    """A user's δ the server cannot apply; the message names the user and what is wrong."""


def check_update(user: int, delta: Theta, reference: Theta, attacker: int | None = None) -> None:
    """What the server checks of each δ it receives, on either engine, before any rule reads it: θ's keys, and for
    each tensor θ's dtype and shape and finite values. `user` is the index (named 1-based, as the metrics files
    number users); `attacker` names that user's update as the attacker's boosted one."""
    who = "the attacker's boosted update" if user == attacker else f"user {user + 1}'s update"
    missing, extra = sorted(reference.keys() - delta.keys()), sorted(delta.keys() - reference.keys())
    if missing or extra:
        problem = f"lacks {missing[0]!r}" if missing else f"holds unexpected key {extra[0]!r}"
        raise RejectedUpdate(f"{who} {problem} (expected the model's keys {', '.join(sorted(reference))})")
    for key, ref in reference.items():
        got = delta[key]
        if not isinstance(got, torch.Tensor) or got.dtype != ref.dtype:
            kind = str(got.dtype).removeprefix("torch.") if isinstance(got, torch.Tensor) else type(got).__name__
            raise RejectedUpdate(f"{who}[{key!r}] is {kind}; expected {str(ref.dtype).removeprefix('torch.')}")
        if got.shape != ref.shape:
            raise RejectedUpdate(f"{who}[{key!r}] has shape {tuple(got.shape)}; expected {tuple(ref.shape)}")
    if not finite(delta):
        raise RejectedUpdate(f"{who} holds NaN or infinite weights")


def weights(sizes: list[int], weighting: str) -> list[float]:
    """α_i: uniform (1/M_min) or proportional to each user's dataset size."""
    if weighting == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    total = sum(sizes)
    return [s / total for s in sizes]


def norm(delta: Theta) -> float:
    """‖δ‖₂ over all of the model's tensors, in float64 so a large model's sum of squares stays exact enough."""
    return float(torch.sqrt(sum(v.double().square().sum() for v in delta.values())))


def clip(delta: Theta, bound: float) -> Theta:
    """δ · min(1, bound / ‖δ‖): an update inside the ball is left as it is (the same tensors)."""
    n = norm(delta)
    if n <= bound:
        return delta
    return {k: v * (bound / n) for k, v in delta.items()}


def constrain(delta: Theta, bound: float) -> Theta:
    """Constrain-and-scale (Bagdasaryan et al. 2020): the attacker rescales its update to just under the
    server's norm bound, the largest update that clipping lets through unchanged, whatever the boost was."""
    return {k: v * (NORM_MARGIN * bound / norm(delta)) for k, v in delta.items()}


def client_side(delta: Theta, rule: Federation) -> Theta:
    """What an honest client does to its own δ before uploading under secure aggregation: the server
    cannot clip a masked update, so clipping, when the rule asks for it, moves to the client."""
    return clip(delta, rule.norm_clip.clip_norm) if rule.aggregator == "norm_clip" else delta


def _weighted(deltas: list[Theta], alphas: list[float]) -> Theta:
    return {k: sum(a * d[k] for a, d in zip(alphas, deltas)) for k in deltas[0]}


# --- the rules: each returns the step Σ and the std of the Gaussian noise added to it --------------


def _norm_clip(deltas: list[Theta], alphas: list[float], rule: Federation) -> tuple[Theta, float]:
    """Sun et al. 2019: every δ_i clipped to L2 norm clip_norm, the weighted mean, optional noise (weak DP)."""
    c = rule.norm_clip
    return _weighted([clip(d, c.clip_norm) for d in deltas], alphas), c.noise


def _arrays(deltas: list[Theta], alphas: list[float]) -> list[tuple[list[np.ndarray], float]]:
    """Flower's `results`: (NDArrays, weight) per client; its weighted helpers divide by the weights' sum,
    so α_i serve as the weight where Flower expects a number of examples."""
    return [([v.detach().cpu().numpy() for v in d.values()], a) for d, a in zip(deltas, alphas)]


def _tensors(arrays: list[np.ndarray], like: Theta) -> Theta:
    return {k: torch.from_numpy(np.asarray(a)).to(like[k]) for k, a in zip(like, arrays)}


def _median(deltas: list[Theta], alphas: list[float], rule: Federation) -> tuple[Theta, float]:
    """Yin et al. 2018: the coordinate-wise median (weights ignored)."""
    from flwr.server.strategy.aggregate import aggregate_median

    return _tensors(aggregate_median(_arrays(deltas, alphas)), deltas[0]), 0.0


def _trimmed_mean(deltas: list[Theta], alphas: list[float], rule: Federation) -> tuple[Theta, float]:
    """Yin et al. 2018: per coordinate, drop the ⌊βn⌋ largest and smallest values and average the rest."""
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg

    return _tensors(aggregate_trimmed_avg(_arrays(deltas, alphas), rule.trimmed_mean.beta), deltas[0]), 0.0


def _multi_krum(deltas: list[Theta], alphas: list[float], rule: Federation) -> tuple[Theta, float]:
    """Blanchard et al. 2017: score each δ_i by the squared distances to its n − f − 2 nearest others,
    keep the m best and take their α-weighted mean (m = 1: Krum)."""
    from flwr.server.strategy.aggregate import aggregate_krum

    k = rule.multi_krum
    return _tensors(aggregate_krum(_arrays(deltas, alphas), k.f, k.m), deltas[0]), 0.0


def flame_admitted(deltas: list[Theta]) -> list[int]:
    """FLAME's filter: HDBSCAN over pairwise cosine distances with min_cluster_size = ⌊n/2⌋ + 1, so at most
    one cluster can form, the majority; the updates outside it are rejected. Cosine ignores length, so a
    boosted update is judged by its direction."""
    from sklearn.cluster import HDBSCAN

    flat = torch.stack([torch.cat([v.detach().double().flatten().cpu() for v in d.values()]) for d in deltas])
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    dist = ((dist + dist.T) / 2).fill_diagonal_(0.0)
    labels = (
        HDBSCAN(
            min_cluster_size=len(deltas) // 2 + 1,
            min_samples=1,
            metric="precomputed",
            allow_single_cluster=True,
            copy=True,
        )
        .fit(dist.numpy())
        .labels_
    )
    return [i for i, label in enumerate(labels) if label != -1]


def _flame(deltas: list[Theta], alphas: list[float], rule: Federation) -> tuple[Theta, float]:
    """Nguyen et al. 2022: the majority cluster's updates (flame_admitted), each clipped at S, the median norm
    of all updates, their α-weighted mean (α renormalised over them), and Gaussian noise of std λS.
    No cluster at all rejects every update: the step is the noise alone."""
    admitted = flame_admitted(deltas)
    s = float(np.median([norm(d) for d in deltas]))
    if not admitted:
        return {k: torch.zeros_like(v) for k, v in deltas[0].items()}, rule.flame.noise * s
    total = sum(alphas[i] for i in admitted)
    return _weighted(
        [clip(deltas[i], s) for i in admitted], [alphas[i] / total for i in admitted]
    ), rule.flame.noise * s


RULES: dict[str, Callable[[list[Theta], list[float], Federation], tuple[Theta, float]]] = {
    "norm_clip": _norm_clip,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "multi_krum": _multi_krum,
    "flame": _flame,
}


def _noise(like: Theta, std: float, g: torch.Generator | None) -> Theta:
    if g is None:
        raise ValueError("aggregate: a rule with noise needs a generator (seeding.generator)")
    return {k: (std * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v) for k, v in like.items()}


def aggregate(
    theta: Theta,
    deltas: list[Theta],
    alphas: list[float],
    rule: Federation = Federation(),
    g: torch.Generator | None = None,
) -> Theta:
    """θ_G + the rule's step. `rule` is the `federation` configuration (aggregator and its hyperparameters);
    `g` draws the rule's noise, if any, on the CPU. Under secure aggregation `deltas` are the masked
    uploads of `secure.mask` (each client's α_i δ_i, α_i being public): the server can only add them up."""
    if rule.secure_aggregation:
        step, std = secure.unmask_sum(deltas, theta), rule.norm_clip.noise if rule.aggregator == "norm_clip" else 0.0
    elif rule.aggregator == "mean":
        return {k: theta[k] + sum(a * d[k] for a, d in zip(alphas, deltas)) for k in theta}
    else:
        step, std = RULES[rule.aggregator](deltas, alphas, rule)
    if std > 0:
        noise = _noise(theta, std, g)
        step = {k: step[k] + noise[k] for k in theta}
    return {k: theta[k] + step[k] for k in theta}
