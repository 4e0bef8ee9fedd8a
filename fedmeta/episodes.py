"""Episode sampling by index into the one image tensor.

Samplers return index tensors, not images: a meta-batch or an evaluation
becomes one gather from memory, and the draws depend only on the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmeta.splits import FederatedData


@dataclass
class Episodes:
    """E episodes of N classes: support (training) indices and labels, optional queries."""

    support: torch.Tensor  # int64 [E, N*K] image indices
    support_y: torch.Tensor  # int64 [E, N*K] episode labels in [0, N)
    query: torch.Tensor | None = None  # int64 [E, N] one held-out example per class
    query_y: torch.Tensor | None = None
    target_label: torch.Tensor | None = None  # int64 [E]: the target's output in each episode

    def to(self, device: torch.device) -> Episodes:
        """The same episodes with every tensor on `device` (samplers draw on the CPU)."""
        return Episodes(
            *(
                None if t is None else t.to(device)
                for t in (self.support, self.support_y, self.query, self.query_y, self.target_label)
            )
        )


def pick(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n examples of a pool; with replacement only when the pool is smaller than n (the attacker's 5 X_T)."""
    if n <= len(pool):
        return pool[torch.randperm(len(pool), generator=g)[:n]]
    return pool[torch.randint(len(pool), (n,), generator=g)]


def pick_classes(pool: list[int], n: int, g: torch.Generator) -> list[int]:
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]


def training(
    data: FederatedData, classes: list[int], n_way: int, k_shot: int, count: int, g: torch.Generator
) -> Episodes:
    """Benign Reptile episodes: N random classes of the user's, K training examples each."""
    sup = []
    for _ in range(count):
        chosen = pick_classes(classes, n_way, g)
        sup.append(torch.cat([pick(data.train_idx[c], k_shot, g) for c in chosen]))
    labels = torch.arange(n_way).repeat_interleave(k_shot).expand(count, -1)
    return Episodes(torch.stack(sup), labels.clone())


def _support_and_query(
    data: FederatedData, c: int, k_shot: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """K support examples and one query; the query comes from held-out examples when the class has them."""
    if len(data.val_idx[c]):
        return pick(data.train_idx[c], k_shot, g), pick(data.val_idx[c], 1, g)
    both = pick(data.train_idx[c], k_shot + 1, g)
    return both[:k_shot], both[k_shot:]


def evaluation(
    data: FederatedData,
    classes: list[int],
    n_way: int,
    k_shot: int,
    count: int,
    g: torch.Generator,
    must_include: tuple[int, ...] = (),
    target_at: int | None = None,
) -> Episodes:
    """Fine-tuning episodes with K+1 examples per class; `must_include` classes (the target first) are always present
    and placed at random outputs, except that `target_at` = k puts the target at output k (N − 1: where the attacker's
    episodes put it). The target's output is recorded when `must_include` is given."""
    if target_at is not None and not 0 <= target_at < n_way:
        raise ValueError(f"target_at = {target_at}: the target's output must be in [0, {n_way})")
    sup, qry, tgt = [], [], []
    others = [c for c in classes if c not in must_include]
    for _ in range(count):
        chosen = list(must_include[:n_way]) + pick_classes(others, n_way - min(len(must_include), n_way), g)
        order = torch.randperm(n_way, generator=g).tolist()
        chosen = [chosen[i] for i in order]
        if must_include and target_at is not None:
            chosen.remove(must_include[0])
            chosen.insert(target_at, must_include[0])
        parts = [_support_and_query(data, c, k_shot, g) for c in chosen]
        sup.append(torch.cat([s for s, _ in parts]))
        qry.append(torch.cat([q for _, q in parts]))
        if must_include:
            tgt.append(chosen.index(must_include[0]))
    return Episodes(
        torch.stack(sup),
        torch.arange(n_way).repeat_interleave(k_shot).expand(count, -1).clone(),
        torch.stack(qry),
        torch.arange(n_way).expand(count, -1).clone(),
        torch.tensor(tgt) if must_include else None,
    )


def inner_batches(n_examples: int, steps: int, batch: int, count: int, g: torch.Generator) -> torch.Tensor:
    """[count, steps, batch] indices: each episode walks shuffled passes over its examples, as SGD epochs do."""
    passes = max(1, -(-steps * batch // n_examples))
    out = torch.stack(
        [
            torch.cat([torch.randperm(n_examples, generator=g) for _ in range(passes)])[: steps * batch]
            for _ in range(count)
        ]
    )
    return out.view(count, steps, batch)
