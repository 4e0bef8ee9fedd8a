"""Everything that exists only for speed, behind one choice: how a Conv4's episodes are computed.

The research code (`reptile`, `evaluation`, `defense`) states each computation once, in plain torch with autograd
and `vmap`, and asks here whether a faster computation of the same function applies. Three entry points, one per
kind of work, all following `implementation` (FEDMETA_ADAPT):
- `adapt`: Adam's inner loop on the softmax loss (Reptile, fine-tuning);
- `per_episode`: a function of each episode's weights (predictions), given the embedding to use;
- `matching_steps`: the defense's two-phase fine-tuning of the embedding and the matching head.
`adapt` and `matching_steps` return None where the reference runs.

The parts, each tested to compute the reference's function (up to round-off; bit for bit across lane counts):
- `lanes`: episodes on CPU threads, one intra-op thread each;
- `conv4`: the Conv4's gradient written out by hand, as TorchScript;
- `kernels`: compiled C++ for two of its operations, chosen against torch's by measurement (FEDMETA_KERNELS);
- `cpu`: the "lanes" inner loops built from them; `stacked`: the "stacked" one, for GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.func import vmap

from fedmeta import model
from fedmeta.errors import FedmetaError
from fedmeta.fast import conv4, cpu, lanes, stacked
from fedmeta.model import Theta

if TYPE_CHECKING:
    from fedmeta.reptile import AdamConfig, AdamState

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


def adapt(
    theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
) -> tuple[Theta, AdamState] | None:
    """`reptile.adapt`'s steps by the chosen implementation, or None where the reference (vmap) runs."""
    impl = implementation(x.device, _is_conv4(theta, x))
    if impl == "lanes":
        return cpu.adapt(theta, x, y, batches, cfg, state)
    if impl == "stacked":
        return stacked.adapt(theta, x, y, batches, cfg, state)
    return None


def per_episode(fn: Callable[..., Any], theta: Theta, *args: Any) -> Any:
    """`vmap(fn)` over episodes, called as fn(embed, theta_e, *args_e): theta and args carry a leading episode axis
    (tensors, or dicts/tuples of them), and so does the result. `embed` is `model.embed`, or under "lanes" (the
    episodes then run one by one on the lanes, never under vmap) the same function by the hand-written forward
    pass (`conv4.embed`): no autograd through it."""
    if implementation(next(iter(theta.values())).device) != "lanes":
        return vmap(lambda *a: fn(model.embed, *a))(theta, *args)
    return lanes.per_episode(lambda *a: fn(conv4.embed, *a), next(iter(theta.values())).shape[0], theta, *args)


def matching_steps(
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
    nll: cpu.HeadLoss,
) -> tuple[Theta, Theta, AdamState, AdamState] | None:
    """The defense's fine-tuning steps on lanes (`cpu.matching_steps`) for a Conv4 embedding under "lanes", else
    None."""
    if implementation(x.device) == "lanes" and set(theta) == model.EMBEDDING_KEYS:
        return cpu.matching_steps(theta, head, theta_adam, head_adam, done, x, y, batches, head_steps, adam, nll)
    return None
