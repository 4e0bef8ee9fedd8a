"""Episode lanes: independent episodes spread over CPU threads instead of `vmap`.

Episodes with their own weights are independent computations. On the CPU,
`vmap` turns per-episode weights into grouped convolutions, which are slow
there, and small kernels gain little from two intra-op threads. A lane is a
Python thread with one intra-op thread (torch releases the GIL inside its
kernels, and the inner loops and predictions run the hand-written Conv4 as
TorchScript, `conv4.script`, which does not hold it between kernels either)
that runs its share of the episodes with ordinary kernels: a contiguous
slice of them (`run`), or an even share of their sequential steps
(`run_chains`). Every step of an episode is computed on one thread whatever
the lane count, so results do not depend on it.

Whether lanes run at all is `fast.implementation`'s choice (FEDMETA_ADAPT);
FEDMETA_LANES=n sets the lane count (default: one per intra-op thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import itemgetter
from typing import Any, TypeVar

import torch
from torch.utils import _pytree as pytree

from fedmeta.errors import FedmetaError

T = TypeVar("T")


def count(n_episodes: int) -> int:
    """FEDMETA_LANES if set, else one lane per intra-op thread; never more lanes than episodes."""
    env = os.environ.get("FEDMETA_LANES", "")
    if env and not (env.isdigit() and int(env) > 0):
        raise FedmetaError(f"FEDMETA_LANES: expected a positive whole number, got {env!r}")
    lanes = int(env) if env else torch.get_num_threads()
    return max(1, min(lanes, n_episodes))


def _on_lanes(tasks: list[Callable[[], T]]) -> list[T]:
    """Each task on its own thread with one intra-op thread and the caller's grad mode; results in order."""
    if len(tasks) == 1:
        return [tasks[0]()]
    threads, grad_mode = torch.get_num_threads(), torch.is_grad_enabled()

    def one_thread(task: Callable[[], T]) -> T:
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_mode):  # grad mode is per thread: the caller's no_grad must reach the lanes
            return task()

    try:
        with ThreadPoolExecutor(len(tasks), thread_name_prefix="fedmeta-lane") as pool:
            return list(pool.map(one_thread, tasks))
    finally:
        torch.set_num_threads(threads)  # the workers' set_num_threads also moved the default for new threads


def run(n_episodes: int, work: Callable[[slice], T]) -> list[T]:
    """`work(lane's slice of episodes)` for each lane, on one thread each; results in episode order."""
    lanes = count(n_episodes)
    bounds = [n_episodes * i // lanes for i in range(lanes + 1)]
    return _on_lanes([partial(work, slice(bounds[i], bounds[i + 1])) for i in range(lanes)])


Piece = tuple[int, int, int]  # (chain, first step, end step)


def schedule(n_chains: int, length: int, lanes: int) -> list[list[Piece]]:
    """McNaughton's wrap-around schedule of n_chains chains of `length` sequential steps on `lanes` lanes.

    The steps are dealt out in chain order, ⌈n_chains·length / lanes⌉ to a lane, so the lanes finish
    together even when the chains do not divide evenly (B = 5 episodes on 2 lanes by whole episodes
    leaves one lane idle a sixth of the time). A chain cut at a lane boundary runs its first steps first
    on the later lane and its last steps last on the earlier one: with lanes ≤ n_chains a chain is no
    longer than a lane's share, so at equal step times the two pieces never overlap.
    """
    total = n_chains * length
    if total == 0:
        return []
    if not 1 <= lanes <= n_chains:  # more lanes would cut a chain in three, which run_chains cannot order
        raise ValueError(f"lanes.schedule: expected 1 ≤ lanes ≤ n_chains ({n_chains}), got lanes={lanes}")
    share = -(-total // lanes)
    plan: list[list[Piece]] = []
    for lo in range(0, total, share):
        hi, pieces = min(lo + share, total), []
        while lo < hi:
            chain, first = divmod(lo, length)
            end = min(length, first + hi - lo)
            pieces.append((chain, first, end))
            lo += end - first
        tail = [pieces.pop(0)] if pieces[0][1] > 0 else []  # the rest of a chain cut at lo: runs last
        head = [pieces.pop()] if pieces and pieces[-1][2] < length else []  # a chain cut at hi: runs first
        plan.append(head + pieces + tail)
    return plan


def run_chains(n_chains: int, length: int, do: Callable[[int, int, int], None]) -> None:
    """Run `length` sequential steps of each of n_chains independent chains, evenly over the lanes (`schedule`):
    do(chain, first, end) runs steps first..end-1 of that chain. A chain's last steps wait until another lane
    has run its first."""
    plan = schedule(n_chains, length, count(n_chains))
    if not plan:
        return
    heads_done = {p[0]: threading.Event() for pieces in plan for p in pieces if p[2] < length}

    def lane(pieces: list[Piece]) -> None:
        try:
            for chain, first, end in pieces:
                if first > 0:
                    heads_done[chain].wait()
                do(chain, first, end)
                if end < length:
                    heads_done[chain].set()
        except BaseException:  # a failing lane must not leave another waiting forever; _on_lanes raises its error
            for event in heads_done.values():
                event.set()
            raise

    _on_lanes([partial(lane, pieces) for pieces in plan])


def per_episode(fn: Callable[..., Any], n_episodes: int, *args: Any) -> Any:
    """What `vmap(fn)(*args)` computes, episode by episode on the lanes: args are tensors or dicts/tuples of
    tensors with a leading episode axis, and so is the result."""

    def lane(sl: slice) -> Any:
        outs = [fn(*pytree.tree_map(itemgetter(j), args)) for j in range(sl.start, sl.stop)]
        return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    parts = run(n_episodes, lane)
    return parts[0] if len(parts) == 1 else pytree.tree_map(lambda *xs: torch.cat(xs), *parts)
