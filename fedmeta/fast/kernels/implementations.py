"""The four operations the hand-written Conv4 step needs from `kernels`, in two implementations each: the compiled C++
(`block0.cpp`, `conv3x3.cpp`, reached through torch.ops.fedmeta) and the torch computations they replace
(`*_reference`).

Both are written in the TorchScript subset of Python (no `from __future__ import annotations`), so that `conv4.script`
compiles whichever `kernels.choose` picked into the scripted step: the reference then runs in the JIT's interpreter
too, without the GIL, and lanes in threads do not queue for it as they would for a Python-registered op.
"""

import torch
import torch.nn.functional as F


def block0_patches(x: torch.Tensor) -> torch.Tensor:
    """The first convolution's input patches [C·9, n·H·W] for x [n, C, H, W]: rows ordered as a conv weight
    [out, C, 3, 3] flattens, columns pixel by pixel, so patches(x).T @ w.flatten(1).T is conv2d(x, w, padding=1)."""
    n, c, h, w = x.shape
    u = F.pad(x, [1, 1, 1, 1]).unfold(2, 3, 1).unfold(3, 3, 1)  # [n, C, H, W, 3, 3]
    return u.permute(1, 4, 5, 0, 2, 3).reshape(c * 9, n * h * w)


def block0_forward_reference(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ReLU(max-pool(x's patches · weight + shift)), the window offset 0..3 of each maximum, the first of ties),
    both [n, C, H/2, W/2] channels last in x's dtype; weight [9·C_in, C] is block 0's conv weight times BN's scale."""
    n, height, width = x.shape[0], x.shape[2], x.shape[3]
    p = torch.addmm(shift, block0_patches(x).T, weight).view(n, height, width, -1).permute(0, 3, 1, 2)
    m, idx = torch.ops.aten.max_pool2d_with_indices(p, [2, 2], [2, 2])
    offset = (idx // width % 2 * 2 + idx % width % 2).to(x.dtype)
    return m.clamp_min(0).contiguous(memory_format=torch.channels_last), offset.contiguous(
        memory_format=torch.channels_last
    )


def block0_backward_reference(
    x: torch.Tensor, dh: torch.Tensor, h: torch.Tensor, arg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given ∂loss/∂h: (Σ over pixels of patch ⊗ ∂(BN output) [9·C_in, C], Σ ∂(BN output) [C]), in float64."""
    g = torch.ops.aten.threshold_backward(dh, h, 0)
    k, n, height, width = x.shape[1] * 9, x.shape[0], x.shape[2], x.shape[3]
    cols = block0_patches(x).view(k, n, height, width)
    rows, side = 2 * h.shape[2], 2 * h.shape[3]
    dw = torch.zeros(k, h.shape[1], dtype=torch.float64)
    for o in range(4):  # the pixels at window offset o, and the gradient of the maxima found there
        cols_o = cols[:, :, o // 2 : rows : 2, o % 2 : side : 2].reshape(k, -1)
        dw += cols_o.double() @ (g * (arg == o)).permute(0, 2, 3, 1).reshape(-1, h.shape[1]).double()
    return dw, g.sum((0, 2, 3)).double()


def conv3x3_forward_reference(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(h, weight, padding=1): a 3×3 convolution, stride 1, no bias."""
    return F.conv2d(h, weight, padding=1)


def conv3x3_backward_reference(
    dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂h, ∂weight) of `conv3x3_forward_reference` given ∂z."""
    dh, dw, _ = torch.ops.aten.convolution_backward(
        dz, h, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    return dh, dw


def block0_forward_compiled(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`block0_forward_reference` fused: each pooling window's four pixels in registers (block0.cpp)."""
    return torch.ops.fedmeta.block0_forward(x, weight, shift)


def block0_backward_compiled(
    x: torch.Tensor, dh: torch.Tensor, h: torch.Tensor, arg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fedmeta.block0_backward(x, dh, h, arg)


def conv3x3_forward_compiled(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`conv3x3_forward_reference` by Winograd's F(2×2, 3×3) (conv3x3.cpp); other shapes run torch's convolution."""
    return torch.ops.fedmeta.conv3x3_forward(h, weight)


def conv3x3_backward_compiled(
    dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fedmeta.conv3x3_backward(dz, h, weight)
