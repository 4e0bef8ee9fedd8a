"""Conv4 as a pure function of a parameter dict.

Keeping the model functional (no nn.Module state) lets every inner loop run
many episodes at once under `torch.func.vmap`, and makes batch norm use the
statistics of each episode's own batch, as Reptile's reference does.

`loss_grad` is the gradient of `loss` written out by hand (no autograd) for
the CPU inner loops of `reptile.adapt`: channels-last activations, compiled
Winograd convolutions (`kernels`), native batch-norm and max-pool kernels, and
the first block (one input channel, nine-tap patches: a poor convolution) with
batch-norm statistics and weight gradient in closed form from the Gram matrix
of the image patches and a fused compiled kernel for the rest, so that its
full-size activations are never written to memory. That part
is written in the TorchScript subset of Python (no `from __future__ import
annotations`, constants as default arguments), so that `script` can compile
it, and `reptile` its inner loop around it, to run on lanes without holding
the GIL; `embed(by_hand=True)` runs predictions through it.
"""
import math
import warnings
from typing import Callable, NamedTuple, Optional, TypeVar

import torch
import torch.nn.functional as F

from fedmeta import kernels
from fedmeta.kernels.implementations import block0_patches

T = TypeVar("T")
Theta = dict[str, torch.Tensor]
Moments = tuple[torch.Tensor, torch.Tensor]  # Σ patch patchᵀ [9C, 9C] and Σ patch [9C], float64

BN_EPS = 1e-5
BLOCKS = 4
EMBEDDING_KEYS = frozenset([f"conv{i}.weight" for i in range(BLOCKS)] + [f"bn{i}.{n}" for i in range(BLOCKS) for n in ("weight", "bias")])
CONV4_KEYS = EMBEDDING_KEYS | {"fc.weight", "fc.bias"}


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


def init_conv4(channels: int, width: int, image_size: int, n_way: int, generator: torch.Generator) -> Theta:
    """Glorot-initialised Conv4: 4 × (3×3 conv, BN, ReLU, 2×2 max-pool), then a linear classifier.

    Convolutions carry no bias: batch norm cancels it, and Adam would turn its
    round-off gradients into full-size random steps.
    """
    params: Theta = {}
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
    """Training-mode BN; with `n_ref`, statistics come from the first `n_ref` samples only.

    Their variance is taken in two passes (mean, then mean squared deviation): torch.var_mean over
    (0, 2, 3) runs about 15 times slower on the CPU (5.4 against 0.33 ms for [25, 64, 28, 28]).
    """
    if n_ref is None:
        return F.batch_norm(h, None, None, weight, bias, training=True, eps=BN_EPS)
    ref = h[:n_ref]
    mean = ref.mean((0, 2, 3), keepdim=True)
    var = (ref - mean).square().mean((0, 2, 3), keepdim=True)
    scale = torch.rsqrt(var + BN_EPS) * weight[:, None, None]
    return torch.addcmul(bias[:, None, None] - mean * scale, h, scale)  # one full-size result, not four


def _relu_max_pool(h: torch.Tensor) -> torch.Tensor:
    """ReLU then 2×2 max-pool. Without autograd (predictions), the maximum of row pairs, then of column
    pairs, clamped after (max commutes with ReLU): the same values as F.max_pool2d(F.relu(h), 2), which
    takes ten times longer on NCHW tensors on the CPU. With autograd, max_pool2d's own backward, whose
    ties go to the first maximum as in `features_backward`."""
    if torch.is_grad_enabled():
        return F.max_pool2d(F.relu(h), 2)
    return _relu_max_pool_values(h)


def _relu_max_pool_values(h: torch.Tensor) -> torch.Tensor:
    """`_relu_max_pool` without autograd, for h [b, C, H, W] in any memory layout."""
    rows, cols = h.shape[2] // 2 * 2, h.shape[3] // 2 * 2
    r = torch.maximum(h[:, :, 0:rows:2, :cols], h[:, :, 1:rows:2, :cols])
    return torch.maximum(r[:, :, :, 0::2], r[:, :, :, 1::2]).clamp_min_(0)


def embed(params: Theta, x: torch.Tensor, n_ref: int | None = None, by_hand: bool = False) -> torch.Tensor:
    """f_θ(x): the flattened output of the four conv blocks (the network without its classifier).

    by_hand: the same function through `features_forward` (channels-last kernels, block 0 fused, see
    `kernels`; several times faster for a 40-episode prediction on this CPU), for predictions on lanes:
    no autograd through it, and not under vmap.
    """
    if by_hand:
        return scripted_features_forward(params, x, None, n_ref, False)[0]
    h = x
    for i in range(BLOCKS):
        h = F.conv2d(h, params[f"conv{i}.weight"], padding=1)
        h = _batch_norm(h, params[f"bn{i}.weight"], params[f"bn{i}.bias"], n_ref)
        h = _relu_max_pool(h)
    return h.flatten(1)


def logits(params: Theta, x: torch.Tensor, n_ref: int | None = None, by_hand: bool = False) -> torch.Tensor:
    return F.linear(embed(params, x, n_ref, by_hand), params["fc.weight"], params["fc.bias"])


def loss(params: Theta, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits(params, x), y)


def _episode_conv(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each episode's 3×3 convolution (padding 1) with its own weight, h [E, C, b, H, W] and
    w [E, K, C, 3, 3] → [E, K, b, H, W], as one batched product of weights and image patches."""
    n_ep, c, b, height, width = h.shape
    cols = F.unfold(h.reshape(n_ep, c * b, height, width), 3, padding=1)  # [E, (C, b, 3·3), H·W]
    cols = cols.view(n_ep, c, b, 9, height * width).transpose(2, 3).reshape(n_ep, c * 9, b * height * width)
    return torch.bmm(w.flatten(2), cols).view(n_ep, -1, b, height, width)


def stacked_loss(params: Theta, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_e loss(params_e, x_e, y_e) for E episodes (params leaves [E, ...], x [E, b, C, H, W], y [E, b])
    as one network whose activations are laid out [E, C, b, H, W]: convolutions are batched matrix
    products, batch norm's per-channel statistics are each episode's own, and one backward pass gives
    every episode its own gradient. The computation `vmap(loss)` makes, in a few large kernels per
    layer instead of vmap's per-operator dispatch and cuDNN's per-group loops, which bound small
    episodes on a GPU; the price is the patch matrices (9× a layer's input) kept for the backward pass."""
    n_ep, b = x.shape[:2]
    h = x.transpose(1, 2)
    for i in range(BLOCKS):
        z = _episode_conv(h, params[f"conv{i}.weight"])
        k, height, width = z.shape[1], z.shape[3], z.shape[4]
        z = F.batch_norm(z.reshape(1, n_ep * k, -1), None, None, params[f"bn{i}.weight"].flatten(), params[f"bn{i}.bias"].flatten(), training=True, eps=BN_EPS)
        h = F.max_pool2d(F.relu(z.view(n_ep * k, b, height, width)), 2).view(n_ep, k, b, height // 2, width // 2)
    feat = h.transpose(1, 2).reshape(n_ep, b, -1)  # [E, b, D], each image's features flattened as embed's
    out = torch.baddbmm(params["fc.bias"].unsqueeze(1), feat, params["fc.weight"].transpose(1, 2))
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / b


# ---- The gradient of `loss` by hand, for one episode (reptile.adapt's CPU path) ----


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


def _pool(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU then 2×2 max-pool of p [b, C, H, W]; max commutes with ReLU, so the pooled values are clamped instead."""
    m, idx = torch.ops.aten.max_pool2d_with_indices(p, [2, 2], [2, 2])
    return m.clamp_min(0), idx


def _pool_backward(dh: torch.Tensor, h: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The gradient at p; the first maximum of a window takes it, as in max_pool2d."""
    g = torch.ops.aten.threshold_backward(dh, h, 0)
    return torch.ops.aten.max_pool2d_with_indices_backward(g, p, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def _block_batch_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_ref: Optional[int], eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm of a channels-last z [b, C, H, W] by the kernel for rows [b·H·W, C] (image by
    image, so the first n_ref images' rows come first): (BN(z) [b, C, H, W], z's rows, mean, 1/std)."""
    z2 = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if n_ref is None:
        p2, mu, invstd = torch.ops.aten.native_batch_norm(z2, weight, bias, None, None, True, 0.0, eps)
    else:  # the statistics by the same kernel on the reference rows (torch.var_mean is 15 times slower here)
        _, mu, invstd = torch.ops.aten.native_batch_norm(z2[: n_ref * z.shape[2] * z.shape[3]], None, None, None, None, True, 0.0, eps)
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


def features_forward(params: Theta, x: torch.Tensor, moments: Optional[Moments] = None, n_ref: Optional[int] = None,
                     with_tape: bool = True, blocks: int = BLOCKS, eps: float = BN_EPS) -> tuple[torch.Tensor, Optional[Tape]]:
    """f_θ(x) [b, D] (training-mode batch norm over x) and the tape for `features_backward`.

    moments: `patch_moments(x)` summed over the batch, if already known (else computed here).
    n_ref: as in `embed`, batch-norm statistics from the first n_ref images only (then `moments` are theirs).
    with_tape=False (predictions): no tape, so each block's tensors are freed as the next one runs, and
    pooling without indices.
    Block 0 never forms its convolution output z: with P the patches and w the weight, z = Pᵀwᵀ, so BN's
    mean and variance are (wᵀΣP)/M and (w G wᵀ)/M − mean² (G = PPᵀ, in float64), BN and the convolution
    fold into one weight and shift, and `kernels`' block-0 forward (fused where compiled) applies them
    window by window, pooling as it goes. The later blocks' convolutions are `kernels`' conv3x3_forward
    (Winograd's algorithm where compiled).
    blocks, eps: BLOCKS and BN_EPS, passed as defaults because TorchScript cannot read module globals.
    """
    n_stat = (x.shape[0] if n_ref is None else n_ref) * x.shape[2] * x.shape[3]  # the pixels batch norm's statistics come from
    if moments is None:
        grams, colsums = patch_moments(x if n_ref is None else x[:n_ref])
        gram, colsum = grams.sum(0), colsums.sum(0)
    else:
        gram, colsum = moments
    w0 = params["conv0.weight"]
    w0d = w0.flatten(1).double()  # [C, 9 c_in]
    gw = w0d @ gram  # row c: (G w_c)ᵀ
    mean = (w0d @ colsum) / n_stat
    var = ((gw * w0d).sum(1) / n_stat - mean * mean).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    scale = params["bn0.weight"].double() * rstd
    shift = params["bn0.bias"].double() - mean * scale
    h0, arg0 = _block0_forward(x, (w0d * scale[:, None]).T.contiguous().to(w0.dtype), shift.to(w0.dtype))
    h = h0
    if not with_tape:
        for i in range(1, blocks):
            z = _conv3x3_forward(h, params[f"conv{i}.weight"])
            h = _relu_max_pool_values(_block_batch_norm(z, params[f"bn{i}.weight"], params[f"bn{i}.bias"], n_ref, eps)[0])
        return h.flatten(1), None
    saved: list[Block] = []
    for i in range(1, blocks):
        h_in = h
        z = _conv3x3_forward(h_in, params[f"conv{i}.weight"])  # channels last, like h_in
        p, z2, mu, invstd = _block_batch_norm(z, params[f"bn{i}.weight"], params[f"bn{i}.bias"], n_ref, eps)
        h, idx = _pool(p)
        saved.append((h_in, p, idx, h, z2, mu, invstd))
    return h.flatten(1), Tape(x, gram, colsum, w0d, gw, mean, rstd, scale, h0, arg0, saved)


def features_backward(params: Theta, tape: Tape, dfeat: torch.Tensor, eps: float = BN_EPS) -> Theta:
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
            dp2, z2, params[f"bn{i}.weight"], None, None, mu, invstd, True, eps, [True, True, True]
        )
        dz = dz2.view(p.shape[0], p.shape[2], p.shape[3], -1).permute(0, 3, 1, 2)
        dh, grads[f"conv{i}.weight"] = _conv3x3_backward(dz, h_in, params[f"conv{i}.weight"])
    x = tape.x
    n_pix = x.shape[0] * x.shape[2] * x.shape[3]
    pdp, dbeta = _block0_backward(x, dh, tape.h0, tape.arg0)
    a = pdp.T  # (P ∂p)ᵀ [C, 9 c_in]
    dgamma = ((a * tape.w0d).sum(1) - tape.mean * dbeta) * tape.rstd  # Σ ∂p·(z − mean)·rstd with z = P w
    k1 = -tape.scale * tape.rstd * dgamma / n_pix
    k0 = -tape.scale * dbeta / n_pix
    dw0 = tape.scale[:, None] * a + k1[:, None] * (tape.gw - tape.mean[:, None] * tape.colsum) + k0[:, None] * tape.colsum
    w0 = params["conv0.weight"]
    grads["conv0.weight"] = dw0.to(w0.dtype).view(w0.shape)
    grads["bn0.weight"] = dgamma.to(w0.dtype)
    grads["bn0.bias"] = dbeta.to(w0.dtype)
    return grads


def loss_grad(params: Theta, x: torch.Tensor, y: torch.Tensor, moments: Optional[Moments] = None) -> Theta:
    """∇_params loss(params, x, y) for one batch x [b, C, H, W], y [b]; equals torch.func.grad(loss) up to round-off.

    The classifier and cross-entropy by hand, around `features_forward` / `features_backward`.
    """
    feat, tape = features_forward(params, x, moments)
    assert tape is not None
    fc_w = params["fc.weight"]
    dlogits = torch.addmm(params["fc.bias"], feat, fc_w.T).softmax(-1)
    dlogits = (dlogits - F.one_hot(y, dlogits.shape[1]).to(dlogits.dtype)) / x.shape[0]
    grads = features_backward(params, tape, dlogits @ fc_w)
    grads["fc.weight"] = dlogits.T @ feat
    grads["fc.bias"] = dlogits.sum(0)
    return grads


def script(fn: Callable[..., T]) -> Callable[..., T]:
    """TorchScript of `fn`: the same aten kernels in the same order (so the same bits), run by the JIT's
    interpreter, which holds no GIL, so lanes in threads do not queue for it between small kernels (in
    Python, a Conv4-64 step of batch 10 took 4.33 ms beside a second lane against 3.62 ms alone).
    torch.jit is deprecated upstream in favour of torch.compile, which on this loop compiled for 23 s and
    ran slower than eager (4.08 against 3.65 ms a step, one thread); torch is pinned, so its deprecation
    warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(fn)


# the operations `kernels.select` chose for this CPU, compiled into the scripted step with it
_block0_forward, _block0_backward, _conv3x3_forward, _conv3x3_backward = kernels.ops()
# the hand-written forward and backward as TorchScript, for callers on lanes (`embed`, the defense)
scripted_features_forward = script(features_forward)
scripted_features_backward = script(features_backward)
