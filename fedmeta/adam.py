"""The paper's inner optimiser, Adam, written functionally: its configuration, its per-episode state and one step.

Weights and moments carry a leading episode axis, so one `adam_update` steps every episode at once and no
optimizer object exists per episode. Reptile, fine-tuning and the defense step with it; `fedmeta.fast` repeats
its arithmetic op for op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmeta import portable
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
        denom = portable.sqrt(state.v[k]).div_(bc2_sqrt).add_(cfg.eps)
        new[k] = p.addcdiv(state.m[k], denom, value=-cfg.lr / bc1)
    return new
