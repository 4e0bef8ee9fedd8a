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

import psutil
import pytest
import torch

from fedmeta import config, model, runtime
from fedmeta.engine import plan, processes
from fedmeta.errors import FedmetaError
from fedmeta.experiment import Experiment

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


def flower_params(omniglot_dir, **federation) -> config.Config:
    raw = tiny_raw(omniglot_dir)
    users = raw["federation"]["users"]
    raw["federation"] |= {"engine": "flower", "flower": {"port": free_base_port(users + 1), "round_timeout": 120.0}, **federation}
    if "experiment4" in raw and raw["federation"]["min_updates"] < 3:  # Experiment 4's m4 (median) needs 3: keep it valid
        raw["experiment4"]["federations"]["m4"] = {"federation": {"min_updates": 3}}
    return config.parse(raw)


@pytest.fixture()
def flower_exp(omniglot_dir, tiny_data) -> Iterator[Experiment]:
    exp = Experiment(flower_params(omniglot_dir), tiny_data, torch.device("cpu"))
    yield exp
    if exp.flower is not None:
        exp.flower.close()


def init(exp: Experiment) -> dict[str, torch.Tensor]:
    channels, side = exp.images.shape[1], exp.images.shape[-1]
    return model.init_conv4(channels, exp.p.budget.width, side, exp.p.reptile.n_way, exp.gen("init"))


def test_two_rounds_equal_local_bit_for_bit_and_leave_no_process(tiny_exp: Experiment, flower_exp: Experiment) -> None:
    runtime.configure(tiny_exp.p)
    local = flower = init(tiny_exp)
    timings = []
    for rnd in range(2):
        start = time.perf_counter()
        local = tiny_exp.round(local, rnd, False, pretraining=True)
        middle = time.perf_counter()
        flower = flower_exp.round(flower, rnd, False, pretraining=True)
        timings.append((middle - start, time.perf_counter() - middle))
        assert all(torch.equal(local[k], flower[k]) for k in local), f"round {rnd}: θ differs from the local engine's"
    assert flower_exp.flower is not None
    pids = flower_exp.flower.pids()
    assert len(pids) >= 1 + tiny_exp.p.federation.users
    flower_exp.flower.close()
    assert processes.pids_alive(pids) == []
    print("seconds per round (local, flower):", timings)


def test_a_bound_port_is_one_line_naming_it(omniglot_dir, tiny_data) -> None:
    params = flower_params(omniglot_dir)
    port = params.federation.flower.port
    with socket.socket() as s:
        s.bind((processes.HOST, port))
        s.listen()
        exp = Experiment(params, tiny_data, torch.device("cpu"))
        with pytest.raises(FedmetaError, match=rf"^federation.flower.port: SuperLink port {port} on 127.0.0.1 cannot be bound") as err:
            exp.round(init(exp), 0, False, pretraining=True)
    assert "\n" not in str(err.value)
    assert exp.flower is not None and exp.flower.sup is None


def kill_when_training(sup: processes.Supervisor, name: str, limit: float) -> None:
    """Stop SuperNode `name` (SIGTERM, SIGKILL after the grace) once its ClientApp process runs: mid-round."""
    proc, deadline = sup.procs[name], time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if any("flwr-clientapp" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)):
                break
        except psutil.Error:
            pass
        time.sleep(0.05)
    sup.stop(name)


def test_a_supernode_killed_mid_round_leaves_the_next_users_in_order(omniglot_dir, tiny_data) -> None:
    """M_r = 3 > M_min = 2: the first user in fedmeta's order loses its SuperNode while it trains; the round
    completes, within a bounded time, with the next two, exactly as the local engine computes them without it."""
    exp = Experiment(flower_params(omniglot_dir, min_updates=2), tiny_data, torch.device("cpu"))
    runtime.configure(exp.p)
    try:
        theta = exp.round(init(exp), 0, False)  # every SuperNode joins and is known
        selection = plan.select(exp.p, "1", False)
        victim = selection.order[0]
        assert exp.flower is not None and exp.flower.sup is not None
        killer = threading.Thread(target=kill_when_training, args=(exp.flower.sup, f"supernode{victim}", 60.0))
        killer.start()
        started = time.monotonic()
        got = exp.round(theta, 1, False)
        took = time.monotonic() - started
        killer.join()
        print(f"round with a SuperNode killed mid-round: {took:.1f} s")
        assert took < 60.0
        applied = selection.applied_given({victim})
        assert applied is not None and victim not in applied
        deltas = [exp.local_update(theta, u, 1, "1", False) for u in applied]
        want = plan.combine(exp.p, theta, deltas, [exp._size(u, False) for u in applied], "1")
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        pids = exp.flower.pids() if exp.flower is not None else []
        if exp.flower is not None:
            exp.flower.close()
    assert processes.pids_alive(pids) == []


def test_a_round_past_its_timeout_is_a_clear_error_and_stops_everything(omniglot_dir, tiny_data) -> None:
    raw_timeout = 2.0
    params = flower_params(omniglot_dir)
    params = params.model_copy(update={"federation": params.federation.model_copy(update={"flower": params.federation.flower.model_copy(update={"round_timeout": raw_timeout})})})
    exp = Experiment(params, tiny_data, torch.device("cpu"))
    try:
        with pytest.raises(FedmetaError, match=r"^federated round pretrain-0 on Flower failed after \d+ s: TimeoutError: .*federation.flower.round_timeout.*rerun to resume$"):
            exp.round(init(exp), 0, False, pretraining=True)
    finally:
        assert exp.flower is not None
        pids = exp.flower.pids()
        exp.flower.close()
    assert processes.pids_alive(pids) == []


def _secagg_round(exp: Experiment, theta: dict[str, torch.Tensor], **kind: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """One round 0 on the Flower engine (the federation started and stopped around it): θ', SecAgg+'s statistics;
    every process it started is gone afterwards."""
    try:
        got = exp.round(theta, 0, False, **kind)
        assert exp.flower is not None
        stats = exp.flower.secagg[-1]
    finally:
        pids = exp.flower.pids() if exp.flower is not None else []
        if exp.flower is not None:
            exp.flower.close()
    assert processes.pids_alive(pids) == []
    return got, stats


def test_secagg_plus_equals_the_plain_mean_within_quantization_and_lets_the_boosted_update_through(omniglot_dir, tiny_data) -> None:
    """Flower's SecAgg+ on the attack round (the attacker's boosted δ and M_min − 1 benign ones): θ' equals the
    local engine's plain mean within SecAgg+'s quantization error, and with the default range nothing is clipped."""
    exp = Experiment(flower_params(omniglot_dir, secure_aggregation=True), tiny_data, torch.device("cpu"))
    plain = Experiment(exp.p.model_copy(update={"federation": exp.p.federation.model_copy(update={"secure_aggregation": False, "engine": "local"})}), tiny_data, torch.device("cpu"))
    runtime.configure(exp.p)
    theta = init(exp)
    got, stats = _secagg_round(exp, theta, with_attacker=True)
    want = plain.round(theta, 0, False, with_attacker=True)
    c = stats["clipping_range"]
    assert c == 8.0 * exp.p.attack.boost
    step = 2 * c / 2**22  # one quantization step of SecAgg+'s default 2^22 levels; stochastic rounding errs by less
    err = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    moved = max(float((want[k].double() - theta[k].double()).abs().max()) for k in want)
    print(f"SecAgg+ vs plain mean: max |Δθ| {err:.3g} (quantization step {step:.3g}); the round moved θ by up to {moved:.3g}; "
          f"clipped share {stats['clipped_share']}; per user {stats['per_user']}")
    assert err <= step + 1e-6
    assert stats["clipped_share"] == 0.0
    assert exp.p.federation.attacker in stats["per_user"]


def test_secagg_plus_reports_the_coordinates_its_range_clips(omniglot_dir, tiny_data) -> None:
    """A range below the boosted update's scale silently weakens it: the engine reports the share clipped."""
    params = flower_params(omniglot_dir, secure_aggregation=True)
    fl = params.federation.flower.model_copy(update={"clipping_range": 1e-3})
    exp = Experiment(params.model_copy(update={"federation": params.federation.model_copy(update={"flower": fl})}), tiny_data, torch.device("cpu"))
    runtime.configure(exp.p)
    _, stats = _secagg_round(exp, init(exp), pretraining=True)
    print("clipped share at clipping_range 1e-3:", stats["clipped_share"])
    assert 0.0 < stats["clipped_share"] <= 1.0
