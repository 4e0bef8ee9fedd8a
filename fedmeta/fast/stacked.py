"""The "stacked" inner loop (the default off the CPU): all episodes of a call in lock-step as one network.

`vmap(grad(loss))` over episodes with their own weights dispatches per operator and, on a GPU, runs cuDNN's
per-group loops, which bound small episodes. `stacked_loss` lays the episodes' activations out [E, C, b, H, W] so
that each layer is a few large kernels (batched matrix products, one batch norm over E·C channels), and one
autograd pass gives every episode its own gradient; the price is the patch matrices (9× a layer's input) kept for
the backward pass.
Predictions (`embed`) stay one episode at a time under `vmap`, pooling without the indices autograd would need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedmeta import model
from fedmeta.adam import AdamConfig, AdamState
from fedmeta.fast.conv4 import adam_, relu_max_pool_values
from fedmeta.model import BLOCKS, BN_EPS, Theta


def _episode_conv(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each episode's 3×3 convolution (padding 1) with its own weight, h [E, C, b, H, W] and
    w [E, K, C, 3, 3] → [E, K, b, H, W], as one batched product of weights and image patches."""
    n_ep, c, b, height, width = h.shape
    cols = F.unfold(h.reshape(n_ep, c * b, height, width), 3, padding=1)  # [E, (C, b, 3·3), H·W]
    cols = cols.view(n_ep, c, b, 9, height * width).transpose(2, 3).reshape(n_ep, c * 9, b * height * width)
    return torch.bmm(w.flatten(2), cols).view(n_ep, -1, b, height, width)


def stacked_loss(theta: Theta, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_e loss(theta_e, x_e, y_e) for E episodes (theta leaves [E, ...], x [E, b, C, H, W], y [E, b]) as one
    network whose activations are laid out [E, C, b, H, W]: convolutions are batched matrix products, batch
    norm's per-channel statistics are each episode's own. The computation `vmap(model.loss)` makes."""
    n_ep, b = x.shape[:2]
    h = x.transpose(1, 2)
    for i in range(BLOCKS):
        z = _episode_conv(h, theta[f"conv{i}.weight"])
        k, height, width = z.shape[1], z.shape[3], z.shape[4]
        z = F.batch_norm(
            z.reshape(1, n_ep * k, -1),
            None,
            None,
            theta[f"bn{i}.weight"].flatten(),
            theta[f"bn{i}.bias"].flatten(),
            training=True,
            eps=BN_EPS,
        )
        h = F.max_pool2d(F.relu(z.view(n_ep * k, b, height, width)), 2).view(n_ep, k, b, height // 2, width // 2)
    feat = h.transpose(1, 2).reshape(n_ep, b, -1)  # [E, b, D], each image's features flattened as embed's
    out = torch.baddbmm(theta["fc.bias"].unsqueeze(1), feat, theta["fc.weight"].transpose(1, 2))
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / b


def adapt(
    theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
) -> tuple[Theta, AdamState]:
    """All episodes' steps in lock-step through `stacked_loss`: per step one autograd pass and one
    `_foreach` Adam however many episodes there are, so a GPU runs few, large kernels."""
    keys = list(theta)
    steps = batches.shape[1]
    if steps == 0:
        return theta, state
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    batches = batches.to(x.device)
    with torch.no_grad():
        p = [theta[k].clone() for k in keys]
        v = [state.v[k].clone() for k in keys]
        m = [state.m[k].clone() for k in keys] if cfg.beta1 != 0 else []
    for s in range(steps):
        idx = batches[:, s]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in p]
            loss = stacked_loss(dict(zip(keys, leaves)), x[rows, idx], y[rows, idx])
            grads = list(torch.autograd.grad(loss, leaves))
        with torch.no_grad():
            m = adam_(p, grads, m, v, state.step + s + 1, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps)
    state.m, state.v = dict(zip(keys, m)), dict(zip(keys, v))
    state.step += steps
    return dict(zip(keys, p)), state


def embed(theta: Theta, x: torch.Tensor, n_ref: int | None = None) -> torch.Tensor:
    """`model.embed` without autograd, for predictions under `vmap`: the same convolutions and batch norm, then
    ReLU and max-pool as `conv4.relu_max_pool_values` (max_pool2d's values), which keeps no pooling indices."""
    h = x
    for i in range(BLOCKS):
        h = F.conv2d(h, theta[f"conv{i}.weight"], padding=1)
        h = relu_max_pool_values(model.batch_norm(h, theta[f"bn{i}.weight"], theta[f"bn{i}.bias"], n_ref))
    return h.flatten(1)
