"""Reptile with a functional Adam, run on many episodes at once.

One `adapt` call fine-tunes E copies of the model (one per episode):
parameters carry a leading episode axis and Adam's update is plain tensor
arithmetic, so no model is copied and no optimizer object exists per episode.

Three implementations give the same numbers up to round-off:
- "lanes" (the CPU default for a Conv4, see `lanes`): the episodes' steps
  spread evenly over threads, each step with `model.loss_grad` and an
  in-place `_foreach` Adam on that episode's rows; a lane's run of steps is
  one TorchScript call (`_compiled_episode_steps`), so the lanes do not
  queue for the GIL between kernels.
- "stacked" (the default elsewhere for a Conv4): all E episodes in lock-step
  as one network (`model.stacked_loss`), one autograd pass and one
  `_foreach` Adam per step.
- "vmap": all E episodes in lock-step, gradients from `vmap(grad(loss))`
  (batch norm sees each episode's own batch); any parameter dict.
FEDMETA_ADAPT=lanes|stacked|vmap forces one for a Conv4 (`implementation`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from fedmeta import lanes, model
from fedmeta.config import Reptile
from fedmeta.errors import FedmetaError
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
    def zeros_like(cls, params: Theta) -> "AdamState":
        return cls({k: torch.zeros_like(p) for k, p in params.items()}, {k: torch.zeros_like(p) for k, p in params.items()})

    def clone(self) -> "AdamState":
        return AdamState({k: t.clone() for k, t in self.m.items()}, {k: t.clone() for k, t in self.v.items()}, self.step)


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
        denom = state.v[k].sqrt().div_(bc2_sqrt).add_(cfg.eps)
        new[k] = p.addcdiv(state.m[k], denom, value=-cfg.lr / bc1)
    return new


def adam_(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor], step: int,
          lr: float, beta1: float, beta2: float, eps: float) -> list[torch.Tensor]:
    """`adam_update`'s arithmetic, op for op (so bit for bit), in place on lists; returns the new first moments."""
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    if beta1 == 0:
        m = grads
    else:
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)
    return m


def _episode_steps(keys: list[str], p: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   batches: torch.Tensor, gram: torch.Tensor, colsum: torch.Tensor, first: int, end: int, done: int,
                   lr: float, beta1: float, beta2: float, eps: float) -> list[torch.Tensor]:
    """Steps first..end-1 of one episode (x [n, ...], batches [steps, b], per-image patch moments), Adam in place
    on p and v; returns the first moments. `done` counts the Adam steps taken before this call."""
    for s in range(first, end):
        idx = batches[s]
        params: model.Theta = {}
        for k, t in zip(keys, p):
            params[k] = t
        grads = model.loss_grad(params, x[idx], y[idx], (gram[idx].sum(0), colsum[idx].sum(0)))
        m = adam_(p, [grads[k] for k in keys], m, v, done + s + 1, lr, beta1, beta2, eps)
    return m


_compiled_episode_steps = model.script(_episode_steps)
_batched_grad = vmap(grad(model.loss))


ADAPT_CHOICES = ("lanes", "stacked", "vmap")


def implementation(device: torch.device, conv4: bool = True) -> str:
    """The one choice of how episodes are fine-tuned and predicted, for `adapt`, the evaluation and the defense:
    FEDMETA_ADAPT if set (a misspelt value is an error, not the default), else lanes on the CPU and stacked
    elsewhere; vmap for any model but a Conv4, the only one with a hand-written gradient. "lanes" also means
    predictions through the hand-written forward pass, on the lanes."""
    value = os.environ.get("FEDMETA_ADAPT", "")
    if value not in ("", *ADAPT_CHOICES):
        raise FedmetaError(f"FEDMETA_ADAPT: expected one of {', '.join(ADAPT_CHOICES)}, got {value!r}")
    if not conv4:
        return "vmap"
    return value or ("lanes" if device.type == "cpu" else "stacked")


def _is_conv4(params: Theta, x: torch.Tensor) -> bool:
    return set(params) == model.CONV4_KEYS and x.dim() == 5 and x.dtype in (torch.float32, torch.float64)


def _adapt_stacked(params: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState) -> tuple[Theta, AdamState]:
    """All episodes' steps in lock-step through `model.stacked_loss`: per step one autograd pass and one
    `_foreach` Adam however many episodes there are, so a GPU runs few, large kernels."""
    keys = list(params)
    steps = batches.shape[1]
    if steps == 0:
        return params, state
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    batches = batches.to(x.device)
    with torch.no_grad():
        p = [params[k].clone() for k in keys]
        v = [state.v[k].clone() for k in keys]
        m = [state.m[k].clone() for k in keys] if cfg.beta1 != 0 else []
    for s in range(steps):
        idx = batches[:, s]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in p]
            loss = model.stacked_loss(dict(zip(keys, leaves)), x[rows, idx], y[rows, idx])
            grads = list(torch.autograd.grad(loss, leaves))
        with torch.no_grad():
            m = adam_(p, grads, m, v, state.step + s + 1, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps)
    state.m, state.v = dict(zip(keys, m)), dict(zip(keys, v))
    state.step += steps
    return dict(zip(keys, p)), state


def _adapt_lanes(params: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState) -> tuple[Theta, AdamState]:
    """Each episode's steps with `model.loss_grad` and an in-place `_foreach` Adam on its rows of the
    stacked tensors; the episodes' steps spread evenly over the lanes (`lanes.run_chains`)."""
    keys = list(params)
    n_ep, steps = x.shape[0], batches.shape[1]
    if steps == 0:
        return params, state
    batches = batches.to(x.device)
    with torch.no_grad():
        out = {k: params[k].clone() for k in keys}
        v = {k: state.v[k].clone() for k in keys}
        # with β1 = 0 the first moment is the gradient: each episode's last one is written here at its end
        m = {k: state.m[k].clone() if cfg.beta1 != 0 else torch.empty_like(state.m[k]) for k in keys}
    moments: dict[int, model.Moments] = {}  # per episode, computed by the lane that runs its first steps

    def do(j: int, first: int, end: int) -> None:
        p_j, v_j = [out[k][j] for k in keys], [v[k][j] for k in keys]
        m_j = [m[k][j] for k in keys] if cfg.beta1 != 0 else []
        with torch.no_grad():
            if j not in moments:  # a cut episode's last steps run after its first (lanes.run_chains)
                moments[j] = model.patch_moments(x[j])
            gram, colsum = moments[j]
            m_j = _compiled_episode_steps(keys, p_j, m_j, v_j, x[j], y[j], batches[j], gram, colsum, first, end, state.step,
                                          cfg.lr, cfg.beta1, cfg.beta2, cfg.eps)
            if cfg.beta1 == 0 and end == steps:
                torch._foreach_copy_([m[k][j] for k in keys], m_j)

    lanes.run_chains(n_ep, steps, do)
    state.m, state.v = m, v
    state.step += steps
    return out, state


def expand(params: Theta, n: int) -> Theta:
    """n copies of `params` along a new leading episode axis."""
    return {k: p.unsqueeze(0).expand(n, *p.shape).clone() for k, p in params.items()}


def adapt(
    params: Theta,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    cfg: AdamConfig,
    state: AdamState | None = None,
) -> tuple[Theta, AdamState]:
    """Fine-tune E episodes in parallel (see the module docstring for the two implementations).

    params: leaves [E, ...]; x: [E, n, C, H, W]; y: [E, n];
    batches: [E, steps, b] indices into each episode's n examples (the inner mini-batches).
    Returns the adapted parameters and the Adam state, so a caller can continue.
    """
    state = state if state is not None else AdamState.zeros_like(params)
    impl = implementation(x.device, _is_conv4(params, x))
    if impl == "lanes":
        return _adapt_lanes(params, x, y, batches, cfg, state)
    if impl == "stacked":
        return _adapt_stacked(params, x, y, batches, cfg, state)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    batches = batches.to(x.device)
    for s in range(batches.shape[1]):
        idx = batches[:, s]
        grads = _batched_grad(params, x[rows, idx], y[rows, idx])
        params = adam_update(params, grads, state, cfg)
    return params, state


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
