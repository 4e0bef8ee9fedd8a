"""The in-memory form every dataset reader returns, before splitting."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """All images of a dataset as one uint8 tensor, so episodes are sampled by index.

    `groups[c]` ties classes that must stay on the same side of every split
    (the four rotations of one Omniglot character). `fixed_split`, when the
    dataset defines one (mini-ImageNet's Ravi-Larochelle CSVs), maps
    'train'/'val'/'test' to class indices.
    """

    images: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor  # int64 [n], class index
    class_names: list[str]
    groups: torch.Tensor  # int64 [n_classes]
    fixed_split: dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images: expected a uint8 tensor [n, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels: expected shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        if self.groups.shape != (len(self.class_names),):
            raise ValueError(
                f"groups: expected one group per class ({len(self.class_names)}), got {tuple(self.groups.shape)}"
            )
