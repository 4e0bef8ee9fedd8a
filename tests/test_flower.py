"""federation.engine: flower runs the same rounds through real SuperLink and SuperNode processes on loopback.

Each test starts its own federation on ports of its own, and checks that every
process it started is gone afterwards, whatever happened.
"""
from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from fedmeta import config, model, runtime
from fedmeta.engine import plan, processes
from fedmeta.errors import FedmetaError
from fedmeta.experiment import Lab

from conftest import tiny_raw

TEST_LIMIT_S = 180  # no pytest-timeout in the project: SIGALRM bounds each test


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"a Flower test ran past {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def free_base_port(span: int) -> int:
    """A base port with `span` free ports after it (the SuperLink and one per SuperNode)."""
    for base in range(20000, 60000, 97):
        try:
            for port in range(base, base + span):
                processes.check_port(port, "probe")
            return base
        except FedmetaError:
            continue
    raise RuntimeError("no free ports")


def flower_params(omniglot_dir, **federation) -> config.Params:
    raw = tiny_raw(omniglot_dir)
    users = raw["federation"]["users"]
    raw["federation"] |= {"engine": "flower", "flower": {"port": free_base_port(users + 1), "round_timeout": 120.0}, **federation}
    if "experiment4" in raw and raw["federation"]["min_updates"] < 3:  # Experiment 4's m4 (median) needs 3: keep it valid
        raw["experiment4"]["federations"]["m4"] = {"federation": {"min_updates": 3}}
    return config.parse(raw)


@pytest.fixture()
def flower_lab(omniglot_dir, tiny_data) -> Iterator[Lab]:
    lab = Lab(flower_params(omniglot_dir), tiny_data, torch.device("cpu"))
    yield lab
    if lab.flower is not None:
        lab.flower.close()


def init(lab: Lab) -> dict[str, torch.Tensor]:
    channels, side = lab.images.shape[1], lab.images.shape[-1]
    return model.init_conv4(channels, lab.p.budget.width, side, lab.p.reptile.n_way, lab.gen("init"))


def test_two_rounds_equal_local_bit_for_bit_and_leave_no_process(tiny_lab: Lab, flower_lab: Lab) -> None:
    runtime.configure(tiny_lab.p)
    local = flower = init(tiny_lab)
    timings = []
    for rnd in range(2):
        start = time.perf_counter()
        local = tiny_lab.round(local, rnd, False, pretraining=True)
        middle = time.perf_counter()
        flower = flower_lab.round(flower, rnd, False, pretraining=True)
        timings.append((middle - start, time.perf_counter() - middle))
        assert all(torch.equal(local[k], flower[k]) for k in local), f"round {rnd}: θ differs from the local engine's"
    assert flower_lab.flower is not None
    pids = flower_lab.flower.pids()
    assert len(pids) >= 1 + tiny_lab.p.federation.users
    flower_lab.flower.close()
    assert processes.pids_alive(pids) == []
    print("seconds per round (local, flower):", timings)


def test_a_bound_port_is_one_line_naming_it(omniglot_dir, tiny_data) -> None:
    params = flower_params(omniglot_dir)
    port = params.federation.flower.port
    with socket.socket() as s:
        s.bind((processes.HOST, port))
        s.listen()
        lab = Lab(params, tiny_data, torch.device("cpu"))
        with pytest.raises(FedmetaError, match=rf"^federation.flower.port: SuperLink port {port} on 127.0.0.1 cannot be bound") as err:
            lab.round(init(lab), 0, False, pretraining=True)
    assert "\n" not in str(err.value)
    assert lab.flower is not None and lab.flower.sup is None


@pytest.mark.xfail(run=False, reason="unfinished (issue 20): the round waits past the test's limit after the SIGTERM; to be debugged")
def test_a_supernode_killed_mid_round_leaves_the_next_users_in_order(omniglot_dir, tiny_data) -> None:
    """M_r = 3 > M_min = 2: the first user in fedmeta's order loses its SuperNode; the round completes with
    the next two, exactly as the local engine computes them without it."""
    lab = Lab(flower_params(omniglot_dir, min_updates=2), tiny_data, torch.device("cpu"))
    runtime.configure(lab.p)
    try:
        theta = lab.round(init(lab), 0, False)  # every SuperNode joins and is known
        selection = plan.select(lab.p, "1", False)
        victim = selection.order[0]
        assert lab.flower is not None and lab.flower.sup is not None
        killer = threading.Timer(2.0, lab.flower.sup.stop, args=(f"supernode{victim}",))
        killer.start()
        got = lab.round(theta, 1, False)
        killer.join()
        applied = selection.applied_given({victim})
        assert applied is not None and victim not in applied
        deltas = [lab.local_update(theta, u, 1, "1", False) for u in applied]
        want = plan.combine(lab.p, theta, deltas, [lab._size(u, False) for u in applied], "1")
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        pids = lab.flower.pids() if lab.flower is not None else []
        if lab.flower is not None:
            lab.flower.close()
    assert processes.pids_alive(pids) == []


def test_a_round_past_its_timeout_is_a_clear_error_and_stops_everything(omniglot_dir, tiny_data) -> None:
    raw_timeout = 2.0
    params = flower_params(omniglot_dir)
    params = params.model_copy(update={"federation": params.federation.model_copy(update={"flower": params.federation.flower.model_copy(update={"round_timeout": raw_timeout})})})
    lab = Lab(params, tiny_data, torch.device("cpu"))
    try:
        with pytest.raises(FedmetaError, match=r"^federated round pretrain-0 on Flower failed after \d+ s: TimeoutError: .*federation.flower.round_timeout.*rerun to resume$"):
            lab.round(init(lab), 0, False, pretraining=True)
    finally:
        assert lab.flower is not None
        pids = lab.flower.pids()
        lab.flower.close()
    assert processes.pids_alive(pids) == []
