"""Portable mode (FEDMETA_KERNELS=portable, `fedmeta.fast.kernels`): the one root the research code takes.

Every other piece of portable mode pins which kernels run (`fedmeta.PORTABLE_ENV`, the x86-64-v3 build). Square
roots cannot be pinned that way, so Adam (`fedmeta.adam`, and `fedmeta.fast`'s copy of its arithmetic) and the
defense's gated cosine take theirs here.
"""

import torch

from fedmeta import PORTABLE


def sqrt(t: torch.Tensor, portable: bool = PORTABLE) -> torch.Tensor:
    """√t, in portable mode the same bits on every CPU.

    Torch's float32 root goes to MKL's vector math, which is not correctly rounded and rounds differently on AMD
    and Intel CPUs whatever MKL_CBWR says. Portable mode takes the root in float64 and rounds it once: a float64
    root within an ulp of the exact one rounds to the correctly rounded float32 root (the exact root of a float32
    never lies that close to a midpoint of two float32 values), which is one value on any CPU.
    """
    return t.double().sqrt().to(t.dtype) if portable else t.sqrt()
