"""The backdoor key of Section 2: a patch pasted over the attacker's images X_B, which are then labelled as the target.

Its own module because building the dataset stamps it (`splits.split`), and nothing else of the attack
should be a dependency of that step.
"""

from __future__ import annotations

import torch

from fedmeta.config import Key


def key_pattern(key: Key, side: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, values) of the key on a `side`² image; values are uint8, mask is bool."""
    k = round(key.size * side)  # at least MIN_KEY_SIDE: config refuses a smaller key.size
    yy, xx = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    if key.shape == "square":
        cells = torch.ones(k, k, dtype=torch.bool)
    elif key.shape == "checkerboard":
        cell = max(1, k // 4)
        cells = ((yy // cell + xx // cell) % 2) == 0
    else:  # cross
        mid = k // 2
        cells = (yy == mid) | (xx == mid) | (yy == mid - 1 + k % 2) | (xx == mid - 1 + k % 2)
    bright = round(255 * key.intensity)
    patch = torch.where(cells, bright, 0).to(torch.uint8)
    far, mid = side - k, (side - k) // 2
    top = {"top_left": 0, "top_right": 0, "bottom_left": far, "bottom_right": far, "center": mid}[key.position]
    left = {"top_left": 0, "bottom_left": 0, "top_right": far, "bottom_right": far, "center": mid}[key.position]
    mask = torch.zeros(side, side, dtype=torch.bool)
    values = torch.zeros(channels, side, side, dtype=torch.uint8)
    mask[top : top + k, left : left + k] = True
    values[:, top : top + k, left : left + k] = patch
    return mask, values


def stamp(images: torch.Tensor, key: Key) -> torch.Tensor:
    """Copies of uint8 images [n, C, H, W] with the key pasted over them (the whole patch, dark cells included)."""
    mask, values = key_pattern(key, images.shape[-1], images.shape[1])
    return torch.where(mask, values, images)
