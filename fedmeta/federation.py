"""The server's round: who is selected, how their uploads are weighted and combined, and when a round diverged.

`server_round` is the whole of it, written once for both engines: the local engine hands it the users' uploads
from the same process, Flower's ServerApp (fedmeta.engine.flower) from the replies of the users' SuperNodes.
`mean` is the paper's rule, Σ α_i δ_i. The other aggregators are Experiment 4's server-side defenses
(docs/experiment4.md names each one's source and hyperparameters); Flower's strategy helpers and
scikit-learn's HDBSCAN do their arithmetic. `aggregate` takes plain δ_i (or, under secure aggregation,
masked uploads), so any engine that collects updates can call it. What a user uploads, the attacker's boosted
update included, is the client's side (`Experiment.upload`, `attack.boosted_update`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from fedmeta import secure, seeding
from fedmeta.config import Config, Federation, MultiKrum
from fedmeta.errors import Diverged, FedmetaError
from fedmeta.model import Theta


@dataclass(frozen=True)
class Selection:
    """The M_r users asked, in the order their replies count (fedmeta's stand-in for arrival order)."""

    order: list[int]  # benign users asked
    need: int  # how many of them are applied: the first `need` that answer
    always: list[int]  # the attacker, whose update the paper's attack assumes arrives

    @property
    def applied(self) -> list[int]:
        return self.order[: self.need] + self.always

    def applied_given(self, failed: set[int]) -> list[int] | None:
        """The users applied when `failed` never answer; None when too few are left."""
        alive = [u for u in self.order if u not in failed]
        if len(alive) < self.need or failed & set(self.always):
            return None
        return alive[: self.need] + self.always


class Uploads(NamedTuple):
    """What the server received in a round: the applied users, in `Selection.applied` order (or the order of
    the users that answered in their stead), each one's upload and dataset size."""

    users: list[int]
    deltas: list[Theta]
    sizes: list[int]


@dataclass(frozen=True)
class Screening:
    """What a filtering rule (multi_krum, flame) did with a round's uploads: of the applied `users`, those whose
    update it `kept`; it rejected the rest. Experiment 4's detection rates are read off it (`fedmeta.detection`)."""

    users: list[int]
    kept: list[int]

    @property
    def rejected(self) -> list[int]:
        return [u for u in self.users if u not in self.kept]


class Served(NamedTuple):
    """A round's outcome on the server: the new θ_G, and the filtering rule's screening (None: every update
    counted, as under mean, norm_clip, median, trimmed_mean and secure aggregation)."""

    theta: Theta
    screening: Screening | None


PRETRAINING = "pretrain-"


def round_key(rnd: int, pretraining: bool) -> str:
    """A round's seed path. Pretraining rounds draw from their own seeds: round r of pretraining and round r
    after the attack never share episodes."""
    return f"{PRETRAINING}{rnd}" if pretraining else str(rnd)


def round_name(key: str) -> str:
    """How messages name the round of `key`: 'round 3' or 'pretraining round 3'."""
    return f"pretraining round {key.removeprefix(PRETRAINING)}" if key.startswith(PRETRAINING) else f"round {key}"


def select(params: Config, key: str, with_attacker: bool) -> Selection:
    """M_r benign users in a random order (M_r − 1 and the attacker in the attack round), of whom the first
    M_min (M_min − 1) that answer count."""
    fed = params.federation
    benign = [u for u in range(fed.users) if u != fed.attacker]
    extra = 1 if with_attacker else 0
    g = seeding.generator(params.seed, "select", key)
    order = [benign[i] for i in torch.randperm(len(benign), generator=g)[: fed.per_round - extra].tolist()]
    return Selection(order, fed.min_updates - extra, [fed.attacker] if with_attacker else [])


def server_round(
    params: Config, theta: Theta, key: str, with_attacker: bool, clients: Callable[[Selection], Uploads]
) -> Served:
    """One round of the server, θ_G ← θ_G + aggregate(δ_1, …, δ_n): select the users, hand the selection to
    the engine's `clients` (which trains them, here or on their SuperNodes, and returns what was uploaded),
    weight the uploads α_i, mask them under secure aggregation, apply this round's rule, and check the result;
    a filtering rule's screening comes with it."""
    fed = params.federation
    got = clients(select(params, key, with_attacker))
    for u, d in zip(got.users, got.deltas):  # on receipt, before any rule reads them
        try:
            check_update(u, d, theta, fed.attacker)
        except RejectedUpdate as err:
            if finite(d):  # wrong keys, dtype or shape: a faulty client, not a diverged one
                raise
            raise Diverged(f"{round_name(key)} diverged: {err}; likely cause: {_cause(params, u)}") from None
    alphas = weights(got.sizes, fed.weighting)
    sent = got.deltas
    if fed.secure_aggregation:
        users = got.users
        sent = secure.mask(sent, alphas, lambda i, j: seeding.generator(params.seed, "secagg", key, users[i], users[j]))
    new, kept = aggregate_kept(theta, sent, alphas, fed, seeding.generator(params.seed, "aggregate", key))
    check(params, key, new, masked=False)
    return Served(new, None if kept is None else Screening(got.users, [got.users[i] for i in kept]))


def _cause(params: Config, user: int) -> str:
    """The parameters that make user `user`'s local training diverge."""
    a, b, prof = params.attack, params.budget, f"profiles.{params.profile}"
    if user == params.federation.attacker:
        return f"attack.lr = {a.lr} or attack.boost = {a.boost} too large"
    return f"{prof}.inner_lr = {b.inner_lr} or {prof}.outer_step = {b.outer_step} too large"


def check(params: Config, key: str, new: Theta, masked: bool) -> None:
    """Raise Diverged when the round's model `new` holds NaN or infinite weights. Every update the server saw was
    checked on receipt, so what is left is the rule's sum overflowing, or, when it saw only the masked sum
    (`masked`), any user's update. One check per round."""
    if finite(new):
        return
    where, a, b, prof = f"{round_name(key)} diverged", params.attack, params.budget, f"profiles.{params.profile}"
    if masked:
        raise Diverged(
            f"{where}: the aggregated model holds NaN or infinite weights; likely cause: {prof}.inner_lr = "
            f"{b.inner_lr}, attack.lr = {a.lr} or attack.boost = {a.boost} too large"
        )
    raise Diverged(
        f"{where}: the aggregated model overflowed to NaN or infinite weights; "
        f"likely cause: attack.boost = {a.boost} too large"
    )


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


def client_side(delta: Theta, rule: Federation) -> Theta:
    """What an honest client does to its own δ before uploading under secure aggregation: the server
    cannot clip a masked update, so clipping, when the rule asks for it, moves to the client."""
    return clip(delta, rule.norm_clip.clip_norm) if rule.aggregator == "norm_clip" else delta


def _weighted(deltas: list[Theta], alphas: list[float]) -> Theta:
    return {k: sum(a * d[k] for a, d in zip(alphas, deltas)) for k in deltas[0]}


# --- the rules: each returns the step Σ, the std of the Gaussian noise added to it, and the updates it kept ----

Step = tuple[Theta, float, list[int] | None]  # the step, its noise's std, the indices kept (None: all of them)


def _norm_clip(deltas: list[Theta], alphas: list[float], rule: Federation) -> Step:
    """Sun et al. 2019: every δ_i clipped to L2 norm clip_norm, the weighted mean, optional noise (weak DP)."""
    c = rule.norm_clip
    return _weighted([clip(d, c.clip_norm) for d in deltas], alphas), c.noise, None


def _arrays(deltas: list[Theta], alphas: list[float]) -> list[tuple[list[np.ndarray], float]]:
    """Flower's `results`: (NDArrays, weight) per client; its weighted helpers divide by the weights' sum,
    so α_i serve as the weight where Flower expects a number of examples."""
    return [([v.detach().cpu().numpy() for v in d.values()], a) for d, a in zip(deltas, alphas)]


def _tensors(arrays: list[np.ndarray], like: Theta) -> Theta:
    return {k: torch.from_numpy(np.asarray(a)).to(like[k]) for k, a in zip(like, arrays)}


def _median(deltas: list[Theta], alphas: list[float], rule: Federation) -> Step:
    """Yin et al. 2018: the coordinate-wise median (weights ignored)."""
    from flwr.server.strategy.aggregate import aggregate_median

    return _tensors(aggregate_median(_arrays(deltas, alphas)), deltas[0]), 0.0, None


def _trimmed_mean(deltas: list[Theta], alphas: list[float], rule: Federation) -> Step:
    """Yin et al. 2018: per coordinate, drop the ⌊βn⌋ largest and smallest values and average the rest."""
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg

    return _tensors(aggregate_trimmed_avg(_arrays(deltas, alphas), rule.trimmed_mean.beta), deltas[0]), 0.0, None


def krum_kept(deltas: list[Theta], rule: MultiKrum) -> list[int]:
    """Multi-Krum's filter (Blanchard et al. 2017): score each δ_i by the sum of its squared distances to its
    n − f − 2 nearest others and keep the m lowest scores, in the order Flower's `aggregate_krum` averages them.
    Flower's helper returns only the average; fedmeta needs to know whom it kept (`Screening`), so the selection
    is stated here, on Flower's own distance matrix, and Flower's `aggregate` averages what it keeps."""
    from flwr.server.strategy.aggregate import _compute_distances

    dist = _compute_distances([[v.detach().cpu().numpy() for v in d.values()] for d in deltas])
    closest = max(1, len(deltas) - rule.f - 2)
    scores = [np.sum(dist[i, np.argsort(dist[i])[1 : closest + 1].tolist()]) for i in range(len(deltas))]
    return [int(i) for i in np.argsort(scores)[::-1][len(scores) - rule.m :]]


def _multi_krum(deltas: list[Theta], alphas: list[float], rule: Federation) -> Step:
    """Blanchard et al. 2017: the m updates `krum_kept` keeps, their α-weighted mean (m = 1: Krum)."""
    from flwr.server.strategy.aggregate import aggregate

    kept, results = krum_kept(deltas, rule.multi_krum), _arrays(deltas, alphas)
    return _tensors(aggregate([results[i] for i in kept]), deltas[0]), 0.0, kept


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


def _flame(deltas: list[Theta], alphas: list[float], rule: Federation) -> Step:
    """Nguyen et al. 2022: the majority cluster's updates (flame_admitted), each clipped at S, the median norm
    of all updates, their α-weighted mean (α renormalised over them), and Gaussian noise of std λS.
    No cluster at all rejects every update: the step is the noise alone."""
    admitted = flame_admitted(deltas)
    s = float(np.median([norm(d) for d in deltas]))
    if not admitted:
        return {k: torch.zeros_like(v) for k, v in deltas[0].items()}, rule.flame.noise * s, admitted
    total = sum(alphas[i] for i in admitted)
    return (
        _weighted([clip(deltas[i], s) for i in admitted], [alphas[i] / total for i in admitted]),
        rule.flame.noise * s,
        admitted,
    )


RULES: dict[str, Callable[[list[Theta], list[float], Federation], Step]] = {
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
    """θ_G + the rule's step (`aggregate_kept`, without the record of whom a filtering rule kept)."""
    return aggregate_kept(theta, deltas, alphas, rule, g)[0]


def aggregate_kept(
    theta: Theta,
    deltas: list[Theta],
    alphas: list[float],
    rule: Federation = Federation(),
    g: torch.Generator | None = None,
) -> tuple[Theta, list[int] | None]:
    """θ_G + the rule's step, and the indices of the updates a filtering rule kept (None: it used them all).
    `rule` is the `federation` configuration (aggregator and its hyperparameters); `g` draws the rule's noise,
    if any, on the CPU. Under secure aggregation `deltas` are the masked uploads of `secure.mask` (each client's
    α_i δ_i, α_i being public): the server can only add them up."""
    kept = None
    if rule.secure_aggregation:
        step, std = secure.unmask_sum(deltas, theta), rule.norm_clip.noise if rule.aggregator == "norm_clip" else 0.0
    elif rule.aggregator == "mean":
        return {k: theta[k] + sum(a * d[k] for a, d in zip(alphas, deltas)) for k in theta}, None
    else:
        step, std, kept = RULES[rule.aggregator](deltas, alphas, rule)
    if std > 0:
        noise = _noise(theta, std, g)
        step = {k: step[k] + noise[k] for k in theta}
    return {k: theta[k] + step[k] for k in theta}, kept
