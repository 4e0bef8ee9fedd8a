"""The gradient of `model.loss` for a Conv4, written out by hand, and a lane's run of Adam steps around it.

On the CPU, autograd's bookkeeping and the general-purpose kernels it calls dominate a step of Conv4's small
episodes. This is the same function computed more directly: channels-last activations, the convolutions of blocks
1–3 and block 0's fused forward and backward from `kernels` (whichever implementation `kernels.choose` picked),
native batch-norm and max-pool kernels, and block 0 (one input channel, nine-tap patches: a poor convolution) with
batch-norm statistics and weight gradient in closed form from the Gram matrix of the image patches, so that its
full-size activations are never written to memory.

Everything here is written in the TorchScript subset of Python (no `from __future__ import annotations`, constants
as default arguments), so that `script` can compile it and lanes in threads run it without holding the GIL.
tests/test_bench.py checks it against autograd through `model.loss` and the scripted forms against the eager ones.
"""

import warnings
from collections.abc import Callable
from typing import NamedTuple, Optional, TypeVar

import torch
import torch.nn.functional as F

from fedmeta import PORTABLE
from fedmeta.fast import kernels
from fedmeta.fast.kernels.implementations import block0_patches
from fedmeta.model import BLOCKS, BN_EPS, Theta
from fedmeta.portable import sqrt

T = TypeVar("T")
Moments = tuple[torch.Tensor, torch.Tensor]  # Σ patch patchᵀ [9C, 9C] and Σ patch [9C], float64


def patch_moments(x: torch.Tensor) -> Moments:
    """Per-image patch moments of x [n, C, H, W]: Gram matrices [n, 9C, 9C] and sums [n, 9C], in float64.

    A batch's moments are the sums over its images, so an episode computes them once for all its steps.
    """
    grams: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    for part in x.split(16):  # bounded memory for large images
        cols = block0_patches(part).double().view(x.shape[1] * 9, part.shape[0], -1).transpose(0, 1)  # [n, 9C, H·W]
        grams.append(torch.bmm(cols, cols.transpose(1, 2)))
        sums.append(cols.sum(-1))
    return torch.cat(grams), torch.cat(sums)


def relu_max_pool_values(h: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(F.relu(h), 2)'s values, bit for bit, without autograd, for h [b, C, H, W] in any memory layout:
    the maximum of row pairs, then of column pairs, clamped after (max commutes with ReLU). max_pool2d is slow on
    the CPU for NCHW tensors, and a prediction needs no pooling indices."""
    rows, cols = h.shape[2] // 2 * 2, h.shape[3] // 2 * 2
    r = torch.maximum(h[:, :, 0:rows:2, :cols], h[:, :, 1:rows:2, :cols])
    return torch.maximum(r[:, :, :, 0::2], r[:, :, :, 1::2]).clamp_min_(0)


def _pool(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU then 2×2 max-pool of p [b, C, H, W]; max commutes with ReLU, so the pooled values are clamped instead."""
    m, idx = torch.ops.aten.max_pool2d_with_indices(p, [2, 2], [2, 2])
    return m.clamp_min(0), idx


def _pool_backward(dh: torch.Tensor, h: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The gradient at p; the first maximum of a window takes it, as in max_pool2d."""
    g = torch.ops.aten.threshold_backward(dh, h, 0)
    return torch.ops.aten.max_pool2d_with_indices_backward(g, p, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def _block_batch_norm(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_ref: Optional[int], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm of a channels-last z [b, C, H, W] by the kernel for rows [b·H·W, C] (image by
    image, so the first n_ref images' rows come first): (BN(z) [b, C, H, W], z's rows, mean, 1/std)."""
    z2 = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if n_ref is None:
        p2, mu, invstd = torch.ops.aten.native_batch_norm(z2, weight, bias, None, None, True, 0.0, eps)
    else:  # the statistics by the same kernel on the reference rows (torch.var_mean is 15 times slower here)
        _, mu, invstd = torch.ops.aten.native_batch_norm(
            z2[: n_ref * z.shape[2] * z.shape[3]], None, None, None, None, True, 0.0, eps
        )
        scale = invstd * weight
        p2 = torch.addcmul(bias - mu * scale, z2, scale)
    return p2.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2), z2, mu, invstd


Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Tape(NamedTuple):
    """What `features_backward` needs from `features_forward`: block 0's input, patch algebra, pooled output
    and window offsets, then per later block (block input, BN output p, pool indices, pooled output, conv
    output z2, BN mean, BN 1/std)."""

    x: torch.Tensor
    gram: torch.Tensor
    colsum: torch.Tensor
    w0d: torch.Tensor
    gw: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    scale: torch.Tensor
    h0: torch.Tensor
    arg0: torch.Tensor
    blocks: list[Block]


def features_forward(
    theta: Theta,
    x: torch.Tensor,
    moments: Optional[Moments] = None,
    n_ref: Optional[int] = None,
    with_tape: bool = True,
    blocks: int = BLOCKS,
    eps: float = BN_EPS,
) -> tuple[torch.Tensor, Optional[Tape]]:
    """f_θ(x) [b, D] (training-mode batch norm over x) and the tape for `features_backward`.

    moments: `patch_moments(x)` summed over the batch, if already known (else computed here).
    n_ref: as in `model.embed`, batch-norm statistics from the first n_ref images only (then `moments` are theirs).
    with_tape=False (predictions): no tape, so each block's tensors are freed as the next one runs, and
    pooling without indices.
    Block 0 never forms its convolution output z: with P the patches and w the weight, z = Pᵀwᵀ, so BN's
    mean and variance are (wᵀΣP)/M and (w G wᵀ)/M − mean² (G = PPᵀ, in float64), BN and the convolution
    fold into one weight and shift, and `kernels`' block-0 forward (fused where compiled) applies them
    window by window, pooling as it goes. The later blocks' convolutions are `kernels`' conv3x3_forward
    (Winograd's algorithm where compiled).
    blocks, eps: BLOCKS and BN_EPS, passed as defaults because TorchScript cannot read module globals.
    """
    # the pixels batch norm's statistics come from
    n_stat = (x.shape[0] if n_ref is None else n_ref) * x.shape[2] * x.shape[3]
    if moments is None:
        grams, colsums = patch_moments(x if n_ref is None else x[:n_ref])
        gram, colsum = grams.sum(0), colsums.sum(0)
    else:
        gram, colsum = moments
    w0 = theta["conv0.weight"]
    w0d = w0.flatten(1).double()  # [C, 9 c_in]
    gw = w0d @ gram  # row c: (G w_c)ᵀ
    mean = (w0d @ colsum) / n_stat
    var = ((gw * w0d).sum(1) / n_stat - mean * mean).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    scale = theta["bn0.weight"].double() * rstd
    shift = theta["bn0.bias"].double() - mean * scale
    h0, arg0 = _block0_forward(x, (w0d * scale[:, None]).T.contiguous().to(w0.dtype), shift.to(w0.dtype))
    h = h0
    if not with_tape:
        for i in range(1, blocks):
            z = _conv3x3_forward(h, theta[f"conv{i}.weight"])
            h = relu_max_pool_values(_block_batch_norm(z, theta[f"bn{i}.weight"], theta[f"bn{i}.bias"], n_ref, eps)[0])
        return h.flatten(1), None
    saved: list[Block] = []
    for i in range(1, blocks):
        h_in = h
        z = _conv3x3_forward(h_in, theta[f"conv{i}.weight"])  # channels last, like h_in
        p, z2, mu, invstd = _block_batch_norm(z, theta[f"bn{i}.weight"], theta[f"bn{i}.bias"], n_ref, eps)
        h, idx = _pool(p)
        saved.append((h_in, p, idx, h, z2, mu, invstd))
    return h.flatten(1), Tape(x, gram, colsum, w0d, gw, mean, rstd, scale, h0, arg0, saved)


def features_backward(theta: Theta, tape: Tape, dfeat: torch.Tensor, eps: float = BN_EPS) -> Theta:
    """Gradients of the conv and batch-norm parameters given ∂loss/∂f_θ(x) [b, D]; block 0's weight gradient
    is ∂w = scale·(P ∂p)ᵀ + k1·(G w − mean ΣP) + k0·ΣP for BN's ∂z = scale·∂p + k1·(z − mean) + k0, with
    P ∂p and Σ∂p from `kernels`' block-0 backward."""
    grads: Theta = {}
    dh = dfeat.view(tape.blocks[-1][3].shape)
    for i in range(len(tape.blocks), 0, -1):
        h_in, p, idx, h, z2, mu, invstd = tape.blocks[i - 1]
        dp = _pool_backward(dh, h, p, idx)
        dp2 = dp.permute(0, 2, 3, 1).reshape(z2.shape)
        dz2, grads[f"bn{i}.weight"], grads[f"bn{i}.bias"] = torch.ops.aten.native_batch_norm_backward(
            dp2, z2, theta[f"bn{i}.weight"], None, None, mu, invstd, True, eps, [True, True, True]
        )
        dz = dz2.view(p.shape[0], p.shape[2], p.shape[3], -1).permute(0, 3, 1, 2)
        dh, grads[f"conv{i}.weight"] = _conv3x3_backward(dz, h_in, theta[f"conv{i}.weight"])
    x = tape.x
    n_pix = x.shape[0] * x.shape[2] * x.shape[3]
    pdp, dbeta = _block0_backward(x, dh, tape.h0, tape.arg0)
    a = pdp.T  # (P ∂p)ᵀ [C, 9 c_in]
    dgamma = ((a * tape.w0d).sum(1) - tape.mean * dbeta) * tape.rstd  # Σ ∂p·(z − mean)·rstd with z = P w
    k1 = -tape.scale * tape.rstd * dgamma / n_pix
    k0 = -tape.scale * dbeta / n_pix
    dw0 = (
        tape.scale[:, None] * a + k1[:, None] * (tape.gw - tape.mean[:, None] * tape.colsum) + k0[:, None] * tape.colsum
    )
    w0 = theta["conv0.weight"]
    grads["conv0.weight"] = dw0.to(w0.dtype).view(w0.shape)
    grads["bn0.weight"] = dgamma.to(w0.dtype)
    grads["bn0.bias"] = dbeta.to(w0.dtype)
    return grads


def loss_grad(theta: Theta, x: torch.Tensor, y: torch.Tensor, moments: Optional[Moments] = None) -> Theta:
    """∇_θ model.loss(theta, x, y) for one batch x [b, C, H, W], y [b]; equals torch.func.grad(model.loss) up to
    round-off.

    The classifier and cross-entropy by hand, around `features_forward` / `features_backward`.
    """
    feat, tape = features_forward(theta, x, moments)
    assert tape is not None
    fc_w = theta["fc.weight"]
    dlogits = torch.addmm(theta["fc.bias"], feat, fc_w.T).softmax(-1)
    dlogits = (dlogits - F.one_hot(y, dlogits.shape[1]).to(dlogits.dtype)) / x.shape[0]
    grads = features_backward(theta, tape, dlogits @ fc_w)
    grads["fc.weight"] = dlogits.T @ feat
    grads["fc.bias"] = dlogits.sum(0)
    return grads


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    portable: bool = PORTABLE,
) -> list[torch.Tensor]:
    """`adam.adam_update`'s arithmetic, op for op (so bit for bit), in place on lists of tensors with `_foreach`
    kernels (one call per operation for all tensors, not one per tensor); returns the new first moments."""
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    if beta1 == 0:
        m = grads
    else:
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    denom = [sqrt(t, True) for t in v] if portable else torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)
    return m


def episode_steps(
    keys: list[str],
    p: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    gram: torch.Tensor,
    colsum: torch.Tensor,
    first: int,
    end: int,
    done: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[torch.Tensor]:
    """Steps first..end-1 of one episode (x [n, ...], batches [steps, b], per-image patch moments), Adam in place
    on p and v; returns the first moments. `done` counts the Adam steps taken before this call."""
    for s in range(first, end):
        idx = batches[s]
        theta: Theta = {}
        for k, t in zip(keys, p):
            theta[k] = t
        grads = loss_grad(theta, x[idx], y[idx], (gram[idx].sum(0), colsum[idx].sum(0)))
        m = adam_(p, [grads[k] for k in keys], m, v, done + s + 1, lr, beta1, beta2, eps)
    return m


def script(fn: Callable[..., T]) -> Callable[..., T]:
    """TorchScript of `fn`: the same aten kernels in the same order (so the same bits), run by the JIT's
    interpreter, which holds no GIL, so lanes in threads do not queue for it between small kernels as they
    do in Python (docs/performance.md has the timings, and those of torch.compile, which was slower here).
    torch.jit is deprecated upstream in favour of torch.compile; torch is pinned, so its deprecation
    warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(fn)


# The four operations `kernels.choose` picked for this CPU. Choosing may build and time the C++ kernels, so they are
# bound on first use (`bind`), never on import: each name below stands for its operation until then.
OPS = ("_block0_forward", "_block0_backward", "_conv3x3_forward", "_conv3x3_backward")


def bind() -> None:
    """Bind the operations `kernels.choose` picks (once per process) in place of the placeholders below."""
    globals().update(zip(OPS, kernels.ops()))


def _block0_forward(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bind()
    return _block0_forward(*args)


def _block0_backward(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bind()
    return _block0_backward(*args)


def _conv3x3_forward(*args: torch.Tensor) -> torch.Tensor:
    bind()
    return _conv3x3_forward(*args)


def _conv3x3_backward(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bind()
    return _conv3x3_backward(*args)


class Compiled(NamedTuple):
    """The TorchScript forms, for callers on lanes: predictions (`embed`), the defense, and a lane's run of Reptile
    steps; the chosen operations are compiled into them."""

    features_forward: Callable[..., tuple[torch.Tensor, Optional[Tape]]]
    features_backward: Callable[..., Theta]
    episode_steps: Callable[..., list[torch.Tensor]]


_compiled: list[Compiled] = []


def compiled() -> Compiled:
    """The scripted functions, compiled on first use (after `bind`)."""
    if not _compiled:
        bind()
        _compiled.append(Compiled(script(features_forward), script(features_backward), script(episode_steps)))
    return _compiled[0]


def embed(theta: Theta, x: torch.Tensor, n_ref: Optional[int] = None) -> torch.Tensor:
    """`model.embed` through the scripted hand-written forward pass: no autograd through it, and not under vmap."""
    return compiled().features_forward(theta, x, None, n_ref, False)[0]
