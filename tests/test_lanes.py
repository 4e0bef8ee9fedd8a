"""Episode lanes: the wrap-around schedule and its execution."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from fedmeta.fast import lanes


@pytest.mark.parametrize(
    "n_chains,length,n_lanes",
    [(5, 10, 2), (3, 10, 2), (5, 10, 3), (7, 3, 4), (40, 50, 2), (5, 10, 5), (4, 1, 3), (9, 4, 1)],
)
def test_schedule_covers_every_step_once_in_even_shares_with_heads_before_tails(
    n_chains: int, length: int, n_lanes: int
) -> None:
    plan = lanes.schedule(n_chains, length, n_lanes)
    share = -(-n_chains * length // n_lanes)
    assert len(plan) <= n_lanes
    assert all(sum(end - first for _, first, end in pieces) <= share for pieces in plan)
    steps = sorted((c, s) for pieces in plan for c, first, end in pieces for s in range(first, end))
    assert steps == [(c, s) for c in range(n_chains) for s in range(length)]
    # at one time unit per step, a chain's later piece starts no earlier than its earlier piece ends
    spans: dict[int, list[tuple[int, int, int]]] = {}
    for pieces in plan:
        t = 0
        for c, first, end in pieces:
            spans.setdefault(c, []).append((first, t, t + end - first))
            t += end - first
    for c, parts in spans.items():
        parts.sort()
        assert len(parts) <= 2
        assert all(a[2] <= b[1] for a, b in zip(parts, parts[1:])), (c, parts)


@pytest.mark.parametrize("n_chains,n_lanes", [(2, 3), (5, 0)])
def test_schedule_refuses_more_lanes_than_chains_or_none(n_chains: int, n_lanes: int) -> None:
    with pytest.raises(ValueError, match="lanes.schedule: expected 1 ≤ lanes ≤ n_chains"):
        lanes.schedule(n_chains, 10, n_lanes)


class _WatchedEvent(threading.Event):
    """An Event that reports each wait, so a test can act while a lane is blocked on one."""

    waits = threading.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        _WatchedEvent.waits.release()
        return super().wait(timeout)


@pytest.fixture()
def watched(monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    """Two lanes; returns a semaphore released each time a lane waits for a chain's first steps."""
    monkeypatch.setenv("FEDMETA_LANES", "2")
    monkeypatch.setattr(_WatchedEvent, "waits", threading.Semaphore(0))
    monkeypatch.setattr(lanes, "threading", SimpleNamespace(Event=_WatchedEvent))
    return _WatchedEvent.waits


@pytest.mark.parametrize("n_chains,length", [(0, 10), (5, 0)])
def test_nothing_to_run_gives_an_empty_schedule_and_no_calls(n_chains: int, length: int) -> None:
    assert lanes.schedule(n_chains, length, 2) == []
    calls: list[tuple[int, int, int]] = []
    lanes.run_chains(n_chains, length, lambda *piece: calls.append(piece))
    assert calls == []


def test_run_chains_runs_each_chains_steps_in_order_even_when_a_head_is_slow(watched: threading.Semaphore) -> None:
    """Chain 2 of (5 chains × 10 steps, 2 lanes) is cut; its first steps are held back until the other lane waits
    for them."""
    done: dict[int, list[int]] = {c: [] for c in range(5)}

    def do(chain: int, first: int, end: int) -> None:
        if chain == 2 and first == 0:
            assert watched.acquire(timeout=10)  # the other lane has reached chain 2's last steps and waits
        assert done[chain] == list(range(first)), (chain, first, done[chain])
        done[chain].extend(range(first, end))

    lanes.run_chains(5, 10, do)
    assert done == {c: list(range(10)) for c in range(5)}


def test_run_chains_raises_a_lanes_error_instead_of_leaving_the_other_lane_waiting(
    watched: threading.Semaphore,
) -> None:
    def do(chain: int, first: int, end: int) -> None:
        if chain == 2 and first == 0:
            assert watched.acquire(timeout=10)  # fail only once the other lane waits for these steps
            raise RuntimeError("head failed")

    raised: list[BaseException] = []

    def call() -> None:
        try:
            lanes.run_chains(5, 10, do)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            raised.append(e)

    caller = threading.Thread(target=call, daemon=True)  # a deadlock fails the test instead of hanging it
    caller.start()
    caller.join(20)
    assert not caller.is_alive(), "run_chains hung"
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError) and "head failed" in str(raised[0])
