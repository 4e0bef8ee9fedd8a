"""How computations over many episodes run: one choice per Experiment, made when it is built and passed in.

The research code (`reptile`, `evaluation`, `defense`) states each computation once, in plain torch with autograd
and `vmap`, and asks its backend whether a faster computation of the same function applies. Three entry points,
one per kind of work:
- `adapt`: Adam's inner loop on the softmax loss (Reptile, fine-tuning);
- `per_episode`: a function of each episode's weights (predictions), given the embedding to use;
- `matching_steps`: the defense's two-phase fine-tuning of the embedding and the matching head.
`adapt` and `matching_steps` return None where the research code's own loop runs.

`REFERENCE` is that plain code (FEDMETA_ADAPT=vmap), against which the tests compare every faster backend;
`fedmeta.fast.backend` gives the faster ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.func import vmap

from fedmeta import model
from fedmeta.adam import AdamConfig, AdamState
from fedmeta.model import Theta

# The defense's loss of the matching head on its leave-one-out batch: (features, head, labels, batch) -> loss.
HeadLoss = Callable[[torch.Tensor, Theta, torch.Tensor, torch.Tensor], torch.Tensor]


class Backend(Protocol):
    name: str  # FEDMETA_ADAPT's value for it: vmap, lanes or stacked

    def adapt(
        self, theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
    ) -> tuple[Theta, AdamState] | None:
        """`reptile.adapt`'s steps, or None where its own loop runs."""
        ...

    def per_episode(self, fn: Callable[..., Any], theta: Theta, *args: Any) -> Any:
        """`vmap(fn)` over episodes, called as fn(embed, theta_e, *args_e): theta and args carry a leading episode
        axis (tensors, or dicts/tuples of them), and so does the result; `embed` is `model.embed` or the same
        function computed otherwise."""
        ...

    def matching_steps(
        self,
        theta: Theta,
        head: Theta,
        theta_adam: AdamState,
        head_adam: AdamState,
        done: int,
        x: torch.Tensor,
        y: torch.Tensor,
        batches: torch.Tensor,
        head_steps: int,
        adam: AdamConfig,
        nll: HeadLoss,
    ) -> tuple[Theta, Theta, AdamState, AdamState] | None:
        """The defense's fine-tuning steps, or None where `defense.MatchingDefense.train`'s own loop runs."""
        ...


class Reference:
    """The research code as written: autograd and `vmap`, for any model."""

    name = "vmap"

    def adapt(
        self, theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
    ) -> tuple[Theta, AdamState] | None:
        return None

    def per_episode(self, fn: Callable[..., Any], theta: Theta, *args: Any) -> Any:
        return vmap(lambda *a: fn(model.embed, *a))(theta, *args)

    def matching_steps(self, *args: Any) -> None:
        return None


REFERENCE = Reference()
