"""Episode lanes: independent episodes spread over CPU threads instead of `vmap`.

Episodes with their own weights are independent computations. On the CPU,
`vmap` turns per-episode weights into grouped convolutions, which are slow
there, and small kernels gain little from two intra-op threads. A lane is a
contiguous slice of episodes run by its own Python thread with one intra-op
thread (torch releases the GIL inside its kernels), episode by episode with
ordinary kernels. Every episode is computed on one thread whatever the lane
count, so results do not depend on it.

FEDMETA_ADAPT=vmap forces `vmap` everywhere (lanes is the CPU default);
FEDMETA_LANES=n sets the lane count (default: one per intra-op thread).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

T = TypeVar("T")


def enabled(device: torch.device) -> bool:
    """Lanes on the CPU unless FEDMETA_ADAPT=vmap; vmap elsewhere unless FEDMETA_ADAPT=lanes."""
    forced = os.environ.get("FEDMETA_ADAPT", "")
    if forced in ("vmap", "lanes"):
        return forced == "lanes"
    return device.type == "cpu"


def count(n_episodes: int) -> int:
    """FEDMETA_LANES if set, else one lane per intra-op thread; never more lanes than episodes."""
    env = os.environ.get("FEDMETA_LANES", "")
    lanes = int(env) if env else torch.get_num_threads()
    return max(1, min(lanes, n_episodes))


def run(n_episodes: int, work: Callable[[slice], T]) -> list[T]:
    """`work(lane's slice of episodes)` for each lane, on one thread each; results in episode order."""
    lanes = count(n_episodes)
    bounds = [n_episodes * i // lanes for i in range(lanes + 1)]
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(lanes)]
    if lanes == 1:
        return [work(slices[0])]
    threads, grad_mode = torch.get_num_threads(), torch.is_grad_enabled()

    def one_thread(sl: slice) -> T:
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_mode):  # grad mode is per thread: the caller's no_grad must reach the lanes
            return work(sl)

    try:
        with ThreadPoolExecutor(lanes, thread_name_prefix="fedmeta-lane") as pool:
            return list(pool.map(one_thread, slices))
    finally:
        torch.set_num_threads(threads)  # the workers' set_num_threads also moved the default for new threads


def per_episode(fn: Callable[..., Any], n_episodes: int, *args: Any) -> Any:
    """`vmap(fn)(*args)` computed on lanes when `enabled`: args are tensors or dicts/tuples of tensors
    with a leading episode axis, and so is the result."""
    leaves = pytree.tree_leaves(args)
    if not enabled(leaves[0].device):
        return vmap(fn)(*args)

    def lane(sl: slice) -> Any:
        outs = [fn(*pytree.tree_map(lambda t: t[j], args)) for j in range(sl.start, sl.stop)]
        return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    parts = run(n_episodes, lane)
    return parts[0] if len(parts) == 1 else pytree.tree_map(lambda *xs: torch.cat(xs), *parts)
