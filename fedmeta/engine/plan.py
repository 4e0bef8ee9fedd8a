"""What a round decides before and after local training, shared by both engines.

Selection and aggregation live here once, so the in-process loop and Flower's
ServerApp draw the same users from the same generator and combine the same
δ_i with the same function (fedmeta.federation): the same θ, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmeta import federation, seeding
from fedmeta.config import Config
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


def round_key(rnd: int, pretraining: bool) -> str:
    """Pretraining rounds draw from their own seeds: round r of pretraining and round r after the attack never
    share episodes."""
    return f"pretrain-{rnd}" if pretraining else str(rnd)


def select(params: Config, key: str, with_attacker: bool) -> Selection:
    """M_r benign users (M_r − 1 and the attacker in the attack round), of whom the first M_min (M_min − 1) count."""
    fed = params.federation
    benign = [u for u in range(fed.users) if u != fed.attacker]
    extra = 1 if with_attacker else 0
    asked = fed.per_round - extra
    order = federation.select(benign, asked, asked, seeding.generator(params.seed, "select", key))
    return Selection(order, fed.min_updates - extra, [fed.attacker] if with_attacker else [])


def combine(params: Config, theta: Theta, deltas: list[Theta], sizes: list[int], key: str) -> Theta:
    """fedmeta's aggregator over the applied users' updates, in the order of `Selection.applied`, with
    the generator Experiment.round gives it (a randomised rule draws the same noise on either engine)."""
    fed = params.federation
    alphas = federation.weights(sizes, fed.weighting)
    return federation.aggregate(theta, deltas, alphas, fed, seeding.generator(params.seed, "aggregate", key))
