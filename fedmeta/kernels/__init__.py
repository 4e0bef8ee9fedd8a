"""Compiled CPU kernels for the hand-written Conv4 step, as ops that `model.features_forward` /
`features_backward` call from TorchScript: the first block fused (`block0.cpp`, torch.ops.fedmeta.block0_forward
and block0_backward) and the later blocks' convolutions by Winograd's F(2×2, 3×3) (`conv3x3.cpp`,
torch.ops.fedmeta.conv3x3_forward and conv3x3_backward).

Block 0 (a 3×3 convolution of one or three input channels) does little arithmetic on large tensors: its
output before pooling is four times the pooled size and larger than a core's L2 cache, and torch's kernels
write and reread it four times per training step (matrix product, pooling, the pooling's backward pass,
the weight gradient's product). The fused kernels keep each pooling window in registers instead: 0.14
against 0.47 ms for a step's forward and backward at batch 10, 28 × 28, on this project's CPU.

The later blocks' 64 → 64 convolutions are most of a step's arithmetic, and oneDNN's direct convolution
already runs them near this CPU's peak rate; Winograd's algorithm needs 2.25 times fewer multiplications
(1.6 against 2.5 ms for a step's three convolutions, forward and backward, at batch 10, 28 × 28). It rounds
differently: float32 results agree with the direct convolution's to a few parts in 10⁷, float64 ones to 1e-15.

The C++ sources are compiled on first use (about 10 s, once per machine: torch's extension cache, keyed by
the sources, the flags, and in the module's name the shared header and this CPU's features, since it is built
with -march=native). Where it cannot be
built (no C++ compiler or ninja) or FEDMETA_KERNELS=reference is set, the same ops are registered from
`block0_forward_reference`, `block0_backward_reference` and `conv3x3_*_reference`, the torch computations the
kernels replace: slower, and holding the GIL, with the same results up to round-off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fedmeta.errors import FedmetaError

SOURCES = [Path(__file__).with_name(name) for name in ("block0.cpp", "conv3x3.cpp")]
HEADER = Path(__file__).with_name("vector.h")  # included by both; torch's cache keys on the sources alone
CHOICES = ("compiled", "reference")
_library: torch.library.Library | None = None  # the reference ops' registration, kept alive
backend = ""  # which implementation the ops run: "compiled" or "reference", once `load` has run


def block0_patches(x: torch.Tensor) -> torch.Tensor:
    """The first convolution's input patches [C·9, n·H·W] for x [n, C, H, W]: rows ordered as a conv weight
    [out, C, 3, 3] flattens, columns pixel by pixel, so patches(x).T @ w.flatten(1).T is conv2d(x, w, padding=1)."""
    n, c, h, w = x.shape
    u = F.pad(x, [1, 1, 1, 1]).unfold(2, 3, 1).unfold(3, 3, 1)  # [n, C, H, W, 3, 3]
    return u.permute(1, 4, 5, 0, 2, 3).reshape(c * 9, n * h * w)


def block0_forward_reference(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ReLU(max-pool(x's patches · weight + shift)), the window offset 0..3 of each maximum, the first of ties),
    both [n, C, H/2, W/2] channels last in x's dtype; weight [9·C_in, C] is block 0's conv weight times BN's scale."""
    n, _, height, width = x.shape
    p = torch.addmm(shift, block0_patches(x).T, weight).view(n, height, width, -1).permute(0, 3, 1, 2)
    m, idx = torch.ops.aten.max_pool2d_with_indices(p, [2, 2], [2, 2])
    offset = (idx // width % 2 * 2 + idx % width % 2).to(x.dtype)
    return m.clamp_min(0).contiguous(memory_format=torch.channels_last), offset.contiguous(memory_format=torch.channels_last)


def block0_backward_reference(x: torch.Tensor, dh: torch.Tensor, h: torch.Tensor, arg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Given ∂loss/∂h: (Σ over pixels of patch ⊗ ∂(BN output) [9·C_in, C], Σ ∂(BN output) [C]), in float64."""
    g = torch.ops.aten.threshold_backward(dh, h, 0)
    k, (n, _, height, width) = x.shape[1] * 9, x.shape
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


def conv3x3_backward_reference(dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂h, ∂weight) of `conv3x3_forward_reference` given ∂z."""
    dh, dw, _ = torch.ops.aten.convolution_backward(dz, h, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    return dh, dw


def _build() -> None:
    """Compile and load the C++ sources, which register the ops; raises whatever the build raises."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its import warns that CUDA is absent
    from torch.utils import cpp_extension

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    tag = hashlib.sha256(cpu.encode() + HEADER.read_bytes()).hexdigest()[:8]
    cpp_extension.load(f"fedmeta_kernels_{tag}", [str(s) for s in SOURCES], extra_cflags=["-O3", "-march=native"], is_python_module=False, verbose=False)


def _register_reference() -> None:
    global _library
    _library = torch.library.Library("fedmeta", "DEF")
    _library.define("block0_forward(Tensor x, Tensor weight, Tensor shift) -> (Tensor, Tensor)")
    _library.define("block0_backward(Tensor x, Tensor dh, Tensor h, Tensor arg) -> (Tensor, Tensor)")
    _library.define("conv3x3_forward(Tensor h, Tensor weight) -> Tensor")
    _library.define("conv3x3_backward(Tensor dz, Tensor h, Tensor weight) -> (Tensor, Tensor)")
    for name, fn in (("block0_forward", block0_forward_reference), ("block0_backward", block0_backward_reference),
                     ("conv3x3_forward", conv3x3_forward_reference), ("conv3x3_backward", conv3x3_backward_reference)):
        _library.impl(name, fn, "CPU")


def load() -> str:
    """Register torch.ops.fedmeta.block0_* and conv3x3_*, compiled if possible (see the module docstring); returns `backend`."""
    global backend
    if backend:
        return backend
    choice = os.environ.get("FEDMETA_KERNELS", "compiled")
    if choice not in CHOICES:
        raise FedmetaError(f"FEDMETA_KERNELS: expected one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "compiled":
        try:
            _build()
            backend = "compiled"
            return backend
        except Exception as e:  # no compiler, no ninja, a failed build: the reference ops still give the same results
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            reason = reason if len(reason) <= 120 else reason[:119] + "…"  # a failed build's first line holds the whole compile command
            warnings.warn(f"fedmeta: the compiled CPU kernels could not be built ({reason}); using the slower torch reference", stacklevel=2)
    _register_reference()
    backend = "reference"
    return backend
