"""Conv4 as a pure function of a parameter dict.

Keeping the model functional (no nn.Module state) lets every inner loop run
many episodes at once under `torch.func.vmap`, and makes batch norm use the
statistics of each episode's own batch, as Reptile's reference does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]

BN_EPS = 1e-5
BLOCKS = 4


def feature_size(image_size: int) -> int:
    """Spatial side after four 2×2 max-pools (28 → 1, 84 → 5)."""
    side = image_size
    for _ in range(BLOCKS):
        side //= 2
    return side


def glorot_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Glorot-uniform in place; the paper's defense re-initialises with it."""
    fan_out, fan_in = t.shape[0], t.shape[1]
    receptive = t[0][0].numel() if t.dim() > 2 else 1
    bound = math.sqrt(6.0 / ((fan_in + fan_out) * receptive))
    return t.uniform_(-bound, bound, generator=generator)


def init_conv4(channels: int, width: int, image_size: int, n_way: int, generator: torch.Generator) -> Params:
    """Glorot-initialised Conv4: 4 × (3×3 conv, BN, ReLU, 2×2 max-pool), then a linear classifier.

    Convolutions carry no bias: batch norm cancels it, and Adam would turn its
    round-off gradients into full-size random steps.
    """
    params: Params = {}
    c_in = channels
    for i in range(BLOCKS):
        params[f"conv{i}.weight"] = glorot_(torch.empty(width, c_in, 3, 3), generator)
        params[f"bn{i}.weight"] = torch.ones(width)
        params[f"bn{i}.bias"] = torch.zeros(width)
        c_in = width
    n_features = width * feature_size(image_size) ** 2
    params["fc.weight"] = glorot_(torch.empty(n_way, n_features), generator)
    params["fc.bias"] = torch.zeros(n_way)
    return params


def _batch_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_ref: int | None) -> torch.Tensor:
    """Training-mode BN; with `n_ref`, statistics come from the first `n_ref` samples only."""
    if n_ref is None:
        return F.batch_norm(h, None, None, weight, bias, training=True, eps=BN_EPS)
    ref = h[:n_ref]
    var, mean = torch.var_mean(ref, dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (h - mean) * torch.rsqrt(var + BN_EPS) * weight[:, None, None] + bias[:, None, None]


def embed(params: Params, x: torch.Tensor, n_ref: int | None = None) -> torch.Tensor:
    """f_θ(x): the flattened output of the four conv blocks (the network without its classifier)."""
    h = x
    for i in range(BLOCKS):
        h = F.conv2d(h, params[f"conv{i}.weight"], padding=1)
        h = _batch_norm(h, params[f"bn{i}.weight"], params[f"bn{i}.bias"], n_ref)
        h = F.max_pool2d(F.relu(h), 2)
    return h.flatten(1)


def logits(params: Params, x: torch.Tensor, n_ref: int | None = None) -> torch.Tensor:
    return F.linear(embed(params, x, n_ref), params["fc.weight"], params["fc.bias"])


def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits(params, x), y)
