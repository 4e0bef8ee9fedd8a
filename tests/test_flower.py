"""federation.engine: flower runs the same rounds through real SuperLink and SuperNode processes on loopback.

Each test starts its own federation on ports of its own, and checks that every
process it started is gone afterwards, whatever happened.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import torch

from fedmeta import config, model, runtime
from fedmeta.engine import processes
from fedmeta.errors import FedmetaError
from fedmeta.experiment import Lab

from conftest import tiny_raw

pytestmark = pytest.mark.timeout(240) if hasattr(pytest.mark, "timeout") else []


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
