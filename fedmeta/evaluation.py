"""Few-shot evaluation: fine-tune on each episode's support set, then measure.

All episodes of an evaluation are fine-tuned together (one batched
computation); metrics are read at the requested fine-tuning steps, so one
run of 500 steps yields the whole curve of Experiments 2 and 3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.func import vmap

from fedmeta import head, model, reptile
from fedmeta.adam import AdamConfig, AdamState
from fedmeta.backend import REFERENCE, Backend
from fedmeta.config import Evaluation, Head
from fedmeta.episodes import Episodes, inner_batches
from fedmeta.errors import Diverged
from fedmeta.model import Theta

Z95 = 1.959963984540054
Support = tuple[torch.Tensor, torch.Tensor]  # each episode's support set: images [E, k, ...], labels [E, k]


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


class Learner(Protocol):
    """How a user adapts the shared model to an episode and classifies with it."""

    def start(self, theta: Theta, n_episodes: int, g: torch.Generator, support: Support | None = None) -> object:
        """The state before the first step of `n_episodes` episodes; `support`: their support sets, for a learner
        whose starting point depends on them."""
        ...

    def train(self, state: object, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor) -> object: ...

    def predict(
        self, state: object, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor: ...

    @property
    def queries_independent(self) -> bool:
        """Whether a query's label depends only on the support set, not on the other queries."""
        ...


def predict_logits(
    theta: Theta, support_x: torch.Tensor, x: torch.Tensor, bn_mode: str, backend: Backend = REFERENCE
) -> torch.Tensor:
    """Logits [E, Q, N] for queries x [E, Q, ...] under the chosen batch-norm mode.

    support: statistics of the support set only, so a query's label never depends on the other queries;
    transductive: statistics of the query batch itself (the reference's default);
    support_plus_query: one batch per query made of the support set plus that query (the reference's alternative).
    """
    n_sup = support_x.shape[1]
    if bn_mode == "support":
        return backend.on_features(lambda p, f: model.classifier(p, f)[n_sup:], theta, (support_x, x), n_sup)
    if bn_mode == "transductive":
        return backend.on_features(model.classifier, theta, (x,), None)

    def support_plus_query(p: Theta, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        batches = torch.cat([s.unsqueeze(0).expand(q.shape[0], *s.shape), q.unsqueeze(1)], dim=1)
        return vmap(lambda b: model.logits(p, b)[-1])(batches)

    return backend.per_episode(support_plus_query, theta, support_x, x)


@dataclass
class FineTune:
    """The paper's test-time learner: Adam on the softmax classifier, from the shared θ, its classifier as `head`
    sets it per episode (`fedmeta.head`; `shared`: the paper's)."""

    adam: AdamConfig
    bn_mode: str
    backend: Backend = REFERENCE
    head: Head = "shared"

    @property
    def queries_independent(self) -> bool:
        return self.bn_mode != "transductive"

    def start(
        self, theta: Theta, n_episodes: int, g: torch.Generator, support: Support | None = None
    ) -> tuple[Theta, AdamState]:
        params = reptile.expand(theta, n_episodes)
        if self.head != "shared":
            if support is None:
                raise ValueError(f"FineTune: head {self.head!r} is set from the episodes' support sets; none given")
            params = head.initial(params, self.head, *support, self.backend)
        return params, AdamState.zeros_like(params)

    def train(
        self, state: tuple[Theta, AdamState], x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor
    ) -> tuple[Theta, AdamState]:
        return reptile.adapt(state[0], x, y, batches, self.adam, state[1], self.backend)

    def predict(
        self, state: tuple[Theta, AdamState], support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            return predict_logits(state[0], support_x, x, self.bn_mode, self.backend).argmax(-1)


@dataclass
class Summary:
    mean: float
    ci95: float  # half-width of the normal 95% interval of the mean over episodes

    @classmethod
    def of(cls, per_episode: torch.Tensor) -> Summary:
        n = per_episode.numel()
        std = float(per_episode.std()) if n > 1 else 0.0
        return cls(float(per_episode.mean()), Z95 * std / math.sqrt(n))


def set_predictor(
    learner: Learner, sx: torch.Tensor, sy: torch.Tensor, sets: dict[str, torch.Tensor]
) -> Callable[[object], dict[str, torch.Tensor]]:
    """state ↦ labels for each query set. When queries are classified independently, one call covers
    all sets, joined once here: the support set is then embedded once per prediction, not once per set."""
    if not learner.queries_independent:
        return lambda state: {k: learner.predict(state, sx, sy, x) for k, x in sets.items()}
    if not sets:
        return lambda state: {}
    joint, sizes = torch.cat(list(sets.values()), dim=1), [x.shape[1] for x in sets.values()]
    return lambda state: dict(zip(sets, learner.predict(state, sx, sy, joint).split(sizes, dim=1)))


def run(
    learner: Learner,
    theta: Theta,
    images: torch.Tensor,
    episodes: Episodes,
    cfg: Evaluation,
    record_at: list[int],
    g: torch.Generator,
    probes: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Summary]]:
    """Fine-tune every episode for max(record_at) steps; at each recorded step return
    'main' (accuracy on the episodes' queries) and, per probe set, the share classified as the target."""
    probes = probes or {}
    episodes = episodes.to(images.device)
    n_ep = episodes.support.shape[0]
    sx, sy = to_float(images[episodes.support]), episodes.support_y
    qx = to_float(images[episodes.query]) if episodes.query is not None else None
    probe_x = {k: to_float(images[v]).unsqueeze(0).expand(n_ep, *images[v].shape) for k, v in probes.items()}
    batches = inner_batches(sx.shape[1], max(record_at), cfg.batch, n_ep, g)
    predict = set_predictor(learner, sx, sy, ({"main": qx} if qx is not None else {}) | probe_x)
    state = learner.start(theta, n_ep, g, (sx, sy))
    done, results = 0, []
    for step in sorted(record_at):
        if step > done:
            state = learner.train(state, sx, sy, batches[:, done:step])
            done = step
        point: dict[str, Summary] = {}
        for name, pred in predict(state).items():
            truth = episodes.query_y if name == "main" else episodes.target_label[:, None]
            point[name] = Summary.of((pred == truth).float().mean(1))
        results.append(point)
    if done and not _weights_finite(state):  # one check per fine-tuning run, after its last step
        lr = _LR_KEY.get(type(learner).__name__, "evaluation.lr")
        raise Diverged(
            f"fine-tuning of {n_ep} evaluation episodes diverged by step {done} (NaN or infinite weights); "
            f"likely cause: {lr} too large"
        )
    return results


_LR_KEY = {"MatchingDefense": "defense.lr"}  # the learning rate each learner trains with (FineTune: evaluation.lr)


def _weights_finite(state: object) -> bool:
    """Whether every float tensor of a learner's state is finite, optimiser moments aside."""
    found: list[torch.Tensor] = []

    def walk(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                found.append(torch.isfinite(obj).all())
        elif isinstance(obj, AdamState):
            return
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))

    walk(state)
    return not found or bool(torch.stack(found).all())
