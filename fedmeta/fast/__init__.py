"""Everything that exists only for speed, behind one choice: how a Conv4's episodes are computed.

The research code (`reptile`, `evaluation`, `defense`) states each computation once, in plain torch with autograd
and `vmap`, and is handed a `fedmeta.backend.Backend`. `backend` gives the one `implementation` (FEDMETA_ADAPT)
chooses: the reference itself (vmap), or a `Fast` one computing the same functions faster.

The parts, each tested to compute the reference's function (up to round-off; bit for bit across lane counts):
- `lanes`: episodes on CPU threads, one intra-op thread each;
- `conv4`: the Conv4's gradient written out by hand, as TorchScript;
- `kernels`: compiled C++ for two of its operations, chosen against torch's by measurement (FEDMETA_KERNELS);
- `cpu`: the "lanes" inner loops built from them; `stacked`: the "stacked" one, for GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from fedmeta import model
from fedmeta.adam import AdamConfig, AdamState
from fedmeta.backend import REFERENCE, Backend, HeadLoss, features_then
from fedmeta.errors import FedmetaError
from fedmeta.fast import conv4, cpu, lanes, stacked
from fedmeta.model import Theta

CHOICES = ("lanes", "stacked", "vmap")


def implementation(device: torch.device, conv4: bool = True) -> str:
    """The one choice of how episodes are fine-tuned and predicted: FEDMETA_ADAPT if set (a misspelt value is an
    error, not the default), else lanes on the CPU and stacked elsewhere; vmap (the reference) for any model but a
    Conv4, the only one with a hand-written gradient. "lanes" also means predictions through the hand-written
    forward pass, on the lanes."""
    value = os.environ.get("FEDMETA_ADAPT", "")
    if value not in ("", *CHOICES):
        raise FedmetaError(f"FEDMETA_ADAPT: expected one of {', '.join(CHOICES)}, got {value!r}")
    if not conv4:
        return "vmap"
    return value or ("lanes" if device.type == "cpu" else "stacked")


def _is_conv4(theta: Theta, x: torch.Tensor) -> bool:
    return set(theta) == model.CONV4_KEYS and x.dim() == 5 and x.dtype in (torch.float32, torch.float64)


class Fast:
    """The reference's functions computed faster for a Conv4 (`name`: lanes or stacked); for any other model the
    reference runs."""

    def __init__(self, name: str) -> None:
        self.name = name

    def adapt(
        self, theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
    ) -> tuple[Theta, AdamState] | None:
        """`reptile.adapt`'s steps on the lanes (`cpu.adapt`) or stacked (`stacked.adapt`)."""
        if not _is_conv4(theta, x):
            return None
        return (cpu if self.name == "lanes" else stacked).adapt(theta, x, y, batches, cfg, state)

    def per_episode(self, fn: Callable[..., Any], theta: Theta, *args: Any) -> Any:
        """Under "lanes" the episodes run one by one on the lanes, never under vmap. Otherwise the reference's vmap."""
        if self.name != "lanes":
            return REFERENCE.per_episode(fn, theta, *args)
        return lanes.per_episode(fn, next(iter(theta.values())).shape[0], theta, *args)

    def on_features(
        self, fn: Callable[..., Any], theta: Theta, images: tuple[torch.Tensor, ...], n_ref: int | None, *args: Any
    ) -> Any:
        """f_θ by the hand-written forward pass (`conv4.embed`) on the lanes under "lanes", else by `stacked.embed`
        under vmap: no autograd through either."""
        embed = conv4.embed if self.name == "lanes" else stacked.embed
        return self.per_episode(features_then(fn, embed, n_ref), theta, images, *args)

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
        """The defense's fine-tuning steps on lanes (`cpu.matching_steps`) for a Conv4 embedding under "lanes"."""
        if self.name == "lanes" and set(theta) == model.EMBEDDING_KEYS:
            return cpu.matching_steps(theta, head, theta_adam, head_adam, done, x, y, batches, head_steps, adam, nll)
        return None


def backend(device: torch.device, name: str | None = None) -> Backend:
    """The backend `name` (default: `implementation`'s choice for `device`, FEDMETA_ADAPT): the reference for
    vmap, else the faster computation."""
    name = name or implementation(device)
    if device.type == "cpu":  # FEDMETA_KERNELS' choice (portable mode also pins torch's own kernels) before any work
        conv4.bind()
    return REFERENCE if name == "vmap" else Fast(name)
