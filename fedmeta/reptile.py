"""Reptile with a functional Adam (`fedmeta.adam`), run on many episodes at once.

One `adapt` call fine-tunes E copies of the model (one per episode):
weights carry a leading episode axis and Adam's update is plain tensor
arithmetic, so no model is copied and no optimizer object exists per episode.

`adapt` is the algorithm: gradients from `vmap(grad(loss))` (batch norm sees
each episode's own batch), then `adam_update`. The `backend` a caller passes
(`fedmeta.backend`; an Experiment's is chosen once, when it is built) may
compute the same steps faster; with the reference backend this loop runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, vmap

from fedmeta import model
from fedmeta.adam import AdamConfig, AdamState, adam_update
from fedmeta.backend import REFERENCE, Backend
from fedmeta.config import Reptile
from fedmeta.episodes import Episodes, inner_batches
from fedmeta.model import Theta

_batched_grad = vmap(grad(model.loss))


def expand(theta: Theta, n: int) -> Theta:
    """n copies of `theta` along a new leading episode axis."""
    return {k: p.unsqueeze(0).expand(n, *p.shape).clone() for k, p in theta.items()}


def adapt(
    theta: Theta,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    cfg: AdamConfig,
    state: AdamState | None = None,
    backend: Backend = REFERENCE,
) -> tuple[Theta, AdamState]:
    """Fine-tune E episodes in parallel: each inner batch, every episode's gradient, then Adam.

    theta: leaves [E, ...]; x: [E, n, C, H, W]; y: [E, n];
    batches: [E, steps, b] indices into each episode's n examples (the inner mini-batches).
    Returns the adapted weights and the Adam state, so a caller can continue.
    """
    state = state if state is not None else AdamState.zeros_like(theta)
    result = backend.adapt(theta, x, y, batches, cfg, state)
    if result is not None:
        return result
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    batches = batches.to(x.device)
    for s in range(batches.shape[1]):
        idx = batches[:, s]
        grads = _batched_grad(theta, x[rows, idx], y[rows, idx])
        theta = adam_update(theta, grads, state, cfg)
    return theta, state


def outer_step(theta: Theta, adapted: Theta, epsilon: float, keep: Theta | None = None) -> Theta:
    """θ ← (1 − ε)θ + (ε/B) Σ_j θ_j, with the B adapted models stacked on axis 0. With `keep` (boolean, θ's shapes)
    only the kept coordinates take the step and the others stay exactly as they were: Reptile's outer step is the
    meta-learner's gradient step, which Neurotoxin projects onto the coordinates it may use (`attack.keep_mask`)."""
    new = {k: (1 - epsilon) * p + epsilon * adapted[k].mean(0) for k, p in theta.items()}
    return new if keep is None else {k: torch.where(keep[k], v, theta[k]) for k, v in new.items()}


def meta_train(
    theta: Theta,
    images: torch.Tensor,
    sample: Callable[[int, torch.Generator], Episodes],
    n_episodes: int,
    cfg: Reptile,
    inner_steps: int,
    epsilon: float,
    adam: AdamConfig,
    g: torch.Generator,
    start: int = 0,
    state: AdamState | None = None,
    on_meta_batch: Callable[[int, Theta, AdamState], None] | None = None,
    *,
    backend: Backend,
    keep: Theta | None = None,
) -> Theta:
    """One user's local Reptile: meta-batches of B episodes from `sample` until n_episodes are done.

    With adam_state 'carry', each of the B parallel episode lanes keeps its Adam
    moments into the next meta-batch (the reference carries them across episodes).
    `on_meta_batch(done, theta, state)` sees the loop after each meta-batch, when `g`
    has made all of that batch's draws; calling again with theta, `start=done`,
    `state` and `g` restored to that moment replays the rest exactly (a resumed run).
    `backend` computes each meta-batch's adaptation (`adapt`); `keep` restricts every outer step to the
    coordinates it marks (`outer_step`).
    """
    done = start
    while done < n_episodes:
        count = min(n_episodes - done, cfg.meta_batch)
        eps = sample(count, g).to(images.device)
        x = images[eps.support].float().div_(255)
        batches = inner_batches(eps.support.shape[1], inner_steps, cfg.inner_batch, count, g)
        carried = state if cfg.adam_state == "carry" and state is not None and count == cfg.meta_batch else None
        adapted, state = adapt(expand(theta, count), x, eps.support_y, batches, adam, carried, backend)
        theta = outer_step(theta, adapted, epsilon, keep)
        done += count
        if on_meta_batch is not None:
            on_meta_batch(done, theta, state)
    return theta
