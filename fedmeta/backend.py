"""How computations over many episodes run: one choice per Experiment, made when it is built and passed in.

The research code (`reptile`, `evaluation`, `defense`) states each computation once, in plain torch with autograd
and `vmap`, and asks its backend whether a faster computation of the same function applies. Four entry points,
one per kind of work:
- `adapt`: Adam's inner loop on the softmax loss (Reptile, fine-tuning);
- `per_episode`: a function of each episode's weights (predictions);
- `on_features`: a function of each episode's embeddings f_θ(x) (predictions): how f_θ is computed is the backend's;
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
Embed = Callable[[Theta, torch.Tensor, int | None], torch.Tensor]  # f_θ(x), as `model.embed` is called


class Backend(Protocol):
    name: str  # FEDMETA_ADAPT's value for it: vmap, lanes or stacked

    def adapt(
        self, theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
    ) -> tuple[Theta, AdamState] | None:
        """`reptile.adapt`'s steps, or None where its own loop runs."""
        ...

    def per_episode(self, fn: Callable[..., Any], theta: Theta, *args: Any) -> Any:
        """`vmap(fn)(theta, *args)`: theta and args carry a leading episode axis (tensors, or dicts/tuples of them),
        and so does the result."""
        ...

    def on_features(
        self, fn: Callable[..., Any], theta: Theta, images: tuple[torch.Tensor, ...], n_ref: int | None, *args: Any
    ) -> Any:
        """`per_episode` of fn(theta_e, f_θe(x_e), *args_e), without autograd (predictions): x_e is the episode's
        `images` (each [E, n_i, ...]) joined in order, f_θ is `model.embed`, its batch-norm statistics from the
        first n_ref images (None: all)."""
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


def features_then(fn: Callable[..., Any], embed: Embed, n_ref: int | None) -> Callable[..., Any]:
    """The one-episode function `on_features` maps over episodes, with f_θ computed by `embed`."""

    def one_episode(theta: Theta, images: tuple[torch.Tensor, ...], *args: Any) -> Any:
        x = images[0] if len(images) == 1 else torch.cat(images)
        return fn(theta, embed(theta, x, n_ref), *args)

    return one_episode


class Reference:
    """The research code as written: autograd and `vmap`, for any model."""

    name = "vmap"

    def adapt(
        self, theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
    ) -> tuple[Theta, AdamState] | None:
        return None

    def per_episode(self, fn: Callable[..., Any], theta: Theta, *args: Any) -> Any:
        return vmap(fn)(theta, *args)

    def on_features(
        self, fn: Callable[..., Any], theta: Theta, images: tuple[torch.Tensor, ...], n_ref: int | None, *args: Any
    ) -> Any:
        return self.per_episode(features_then(fn, model.embed, n_ref), theta, images, *args)

    def matching_steps(self, *args: Any) -> None:
        return None


REFERENCE = Reference()
