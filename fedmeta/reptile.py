"""Reptile with a functional Adam, run on many episodes at once.

One `adapt` call fine-tunes E copies of the model (one per episode):
weights carry a leading episode axis and Adam's update is plain tensor
arithmetic, so no model is copied and no optimizer object exists per episode.

`adapt` is written here as the reference: gradients from `vmap(grad(loss))`
(batch norm sees each episode's own batch), then `adam_update`. For a Conv4,
`fast.adapt` computes the same steps faster (on CPU lanes with a hand-written
gradient, or all episodes stacked into one network) and `adapt` returns its
result; FEDMETA_ADAPT=vmap runs this reference instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from fedmeta import fast, model
from fedmeta.config import Reptile
from fedmeta.episodes import Episodes, inner_batches
from fedmeta.model import Theta


@dataclass(frozen=True)
class AdamConfig:
    """The paper's inner optimiser: Adam with β1 = 0, β2 = 0.999, η = 0.001."""

    lr: float = 0.001
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class AdamState:
    """Per-episode moment estimates; `step` counts updates for bias correction."""

    m: Theta
    v: Theta
    step: int = 0

    @classmethod
    def zeros_like(cls, params: Theta) -> AdamState:
        return cls(
            {k: torch.zeros_like(p) for k, p in params.items()}, {k: torch.zeros_like(p) for k, p in params.items()}
        )

    def clone(self) -> AdamState:
        return AdamState(
            {k: t.clone() for k, t in self.m.items()}, {k: t.clone() for k, t in self.v.items()}, self.step
        )


def adam_update(params: Theta, grads: Theta, state: AdamState, cfg: AdamConfig) -> Theta:
    """torch.optim.Adam's arithmetic (bias-corrected, eps outside the root), functionally."""
    state.step += 1
    bc1 = 1 - cfg.beta1**state.step
    bc2_sqrt = (1 - cfg.beta2**state.step) ** 0.5
    new: Theta = {}
    for k, p in params.items():
        g = grads[k]
        state.m[k] = g if cfg.beta1 == 0 else state.m[k].mul(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
        state.v[k] = state.v[k].mul(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        denom = model.sqrt(state.v[k]).div_(bc2_sqrt).add_(cfg.eps)
        new[k] = p.addcdiv(state.m[k], denom, value=-cfg.lr / bc1)
    return new


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
) -> tuple[Theta, AdamState]:
    """Fine-tune E episodes in parallel: each inner batch, every episode's gradient, then Adam.

    theta: leaves [E, ...]; x: [E, n, C, H, W]; y: [E, n];
    batches: [E, steps, b] indices into each episode's n examples (the inner mini-batches).
    Returns the adapted weights and the Adam state, so a caller can continue.
    """
    state = state if state is not None else AdamState.zeros_like(theta)
    result = fast.adapt(theta, x, y, batches, cfg, state)
    if result is not None:
        return result
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    batches = batches.to(x.device)
    for s in range(batches.shape[1]):
        idx = batches[:, s]
        grads = _batched_grad(theta, x[rows, idx], y[rows, idx])
        theta = adam_update(theta, grads, state, cfg)
    return theta, state


def outer_step(theta: Theta, adapted: Theta, epsilon: float) -> Theta:
    """θ ← (1 − ε)θ + (ε/B) Σ_j θ_j, with the B adapted models stacked on axis 0."""
    return {k: (1 - epsilon) * p + epsilon * adapted[k].mean(0) for k, p in theta.items()}


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
) -> Theta:
    """One user's local Reptile: meta-batches of B episodes from `sample` until n_episodes are done.

    With adam_state 'carry', each of the B parallel episode lanes keeps its Adam
    moments into the next meta-batch (the reference carries them across episodes).
    `on_meta_batch(done, theta, state)` sees the loop after each meta-batch, when `g`
    has made all of that batch's draws; calling again with theta, `start=done`,
    `state` and `g` restored to that moment replays the rest exactly (a resumed run).
    """
    done = start
    while done < n_episodes:
        count = min(n_episodes - done, cfg.meta_batch)
        eps = sample(count, g).to(images.device)
        x = images[eps.support].float().div_(255)
        batches = inner_batches(eps.support.shape[1], inner_steps, cfg.inner_batch, count, g)
        carried = state if cfg.adam_state == "carry" and state is not None and count == cfg.meta_batch else None
        adapted, state = adapt(expand(theta, count), x, eps.support_y, batches, adam, carried)
        theta = outer_step(theta, adapted, epsilon)
        done += count
        if on_meta_batch is not None:
            on_meta_batch(done, theta, state)
    return theta
