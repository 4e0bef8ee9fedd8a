"""Secure aggregation (Bonawitz et al. 2017): the server sees only masked uploads whose masks cancel in the sum.

Each client encodes its weighted update α_i δ_i in fixed point as integers modulo 2^62 and adds, for every
other client j in the round, the pairwise mask m_ij (i < j) or subtracts it (i > j). m_ij is drawn from a
seed the two clients share, uniform over the ring, so one masked upload is uniform whatever the update:
it carries no trace of it, while the sum of all uploads is Σ α_i δ_i exactly, up to the fixed point's
rounding (2^-32 per coordinate and client). Deviations from the protocol (docs/experiment4.md): the pair
seeds come from `seeding.generator` instead of a Diffie-Hellman key agreement, and there is no dropout
recovery by secret sharing, since the masks are set among the M_min users whose updates are applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedmeta.model import Theta

RING = 1 << 62  # int64 holds the sum of two ring elements without overflow
SCALE = 2.0**32  # fixed point: |Σ α_i δ_i| may reach 2^29 per coordinate before the ring wraps


def encode(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(torch.round(x.double() * SCALE).long(), RING)


def decode(q: torch.Tensor) -> torch.Tensor:
    """A ring element as the signed fixed-point value it stands for (the upper half is negative)."""
    q = torch.remainder(q, RING)
    return torch.where(q >= RING // 2, q - RING, q).double() / SCALE


def mask(updates: list[Theta], alphas: list[float], pair: Callable[[int, int], torch.Generator]) -> list[Theta]:
    """Every client's upload: encode(α_i δ_i) + Σ_{j>i} m_ij − Σ_{j<i} m_ji mod 2^62, with m_ij drawn
    from `pair(i, j)` (the seed clients i < j share), on the CPU, in the model's key order."""
    sent = [{k: encode(a * v.cpu()) for k, v in u.items()} for u, a in zip(updates, alphas)]
    for i in range(len(sent)):
        for j in range(i + 1, len(sent)):
            g = pair(i, j)
            for k, v in sent[i].items():
                m = torch.randint(0, RING, v.shape, generator=g, dtype=torch.int64)
                sent[i][k] = torch.remainder(v + m, RING)
                sent[j][k] = torch.remainder(sent[j][k] - m, RING)
    return sent


def unmask_sum(uploads: list[Theta], like: Theta) -> Theta:
    """The server's whole view of the round: Σ of the uploads mod 2^62, the masks cancelling, decoded to
    Σ α_i δ_i in the dtype and on the device of `like`."""
    out: Theta = {}
    for k in like:
        total = torch.zeros_like(uploads[0][k])
        for u in uploads:
            total = torch.remainder(total + u[k], RING)
        out[k] = decode(total).to(like[k])
    return out
