"""federation.engine: flower runs the same rounds through real SuperLink and SuperNode processes on loopback.

Starting a federation is most of a test's cost, so the tests share two, as a stage
shares one across its rounds: a plain one (bit identity, then a round past its
timeout, then a SuperNode killed mid-round, in that order: the kill leaves one
user short) and a SecAgg+ one. Each fixture's teardown checks that every process
the federation started is gone, whatever the tests did to it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import torch

from fedmeta import config, model, runtime
from fedmeta.engine import processes
from fedmeta.engine.deployment import FlowerDeployment, private_copy
from fedmeta.engine.worker import Trainer
from fedmeta.errors import FedmetaError
from fedmeta.experiment import Experiment, LocalWork
from fedmeta.federation import select
from fedmeta.splits import FederatedData

from conftest import load_tiny, tiny_raw

TEST_LIMIT_S = 180  # no pytest-timeout in the project: SIGALRM bounds each test and each federation's start and stop


@contextmanager
def alarm(limit: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"a Flower test ran past {limit} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    with alarm(TEST_LIMIT_S):
        yield


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
    raw["federation"] |= {
        "engine": "flower",
        "flower": {"port": free_base_port(users + 1), "round_timeout": 120.0},
        **federation,
    }
    if (
        "experiment4" in raw and raw["federation"]["min_updates"] < 3
    ):  # Experiment 4's m4 (median) needs 3: keep it valid
        raw["experiment4"]["federations"]["m4"] = {"federation": {"min_updates": 3}}
    return config.parse(raw)


def local_twin(params: config.Config, **federation) -> config.Config:
    """The same configuration on the local engine: what the Flower rounds must reproduce."""
    return params.model_copy(
        update={"federation": params.federation.model_copy(update={"engine": "local", **federation})}
    )


@contextmanager
def flower_settings(engine: FlowerDeployment, **flower: object) -> Iterator[None]:
    """Rounds of the running federation under other federation.flower settings (the ServerApp reads each job's
    configuration: round_timeout, clipping_range), without starting another federation."""
    fed = engine.params.federation
    saved = engine.params
    engine.params = saved.model_copy(
        update={"federation": fed.model_copy(update={"flower": fed.flower.model_copy(update=flower)})}
    )
    try:
        yield
    finally:
        engine.params = saved


def init(exp: Experiment) -> dict[str, torch.Tensor]:
    channels, side = exp.images.shape[1], exp.images.shape[-1]
    return model.init_conv4(channels, exp.params.budget.width, side, exp.params.reptile.n_way, exp.gen("init"))


@contextmanager
def federation(params: config.Config, data: FederatedData) -> Iterator[Experiment]:
    """An Experiment on the Flower engine; on leaving, its federation is stopped and none of its processes is left."""
    exp = Experiment(params, data, torch.device("cpu"))
    runtime.configure(params)
    try:
        yield exp
    finally:
        with alarm(TEST_LIMIT_S):
            sup = exp.flower.sup if exp.flower is not None else None
            pids = exp.flower.pids() if exp.flower is not None else []
            # and those a dead SuperNode left to init, found as `stop_all` finds them: by the mark they inherit
            orphans = [p.pid for p in processes.marked(sup.mark) if p.pid not in pids] if sup is not None else []
            if exp.flower is not None:
                exp.flower.close()
        assert processes.pids_alive(pids) == [], "a Flower process outlived its federation"
        assert processes.pids_alive(orphans) == [], "an orphaned Flower process outlived its federation"


@pytest.fixture(scope="module")
def plain(omniglot_dir) -> Iterator[tuple[Experiment, dict[str, torch.Tensor], float]]:
    """M_r = 3 > M_min = 2 (a spare user for the killed-node test), started by round 0 of pretraining:
    the Experiment, θ after that round, and how long it took (start-up included)."""
    params = flower_params(omniglot_dir, min_updates=2)
    with federation(params, load_tiny(params)) as exp:
        with alarm(TEST_LIMIT_S):
            start = time.perf_counter()
            theta = exp.round(init(exp), 0, False, pretraining=True)
            took = time.perf_counter() - start
        yield exp, theta, took


@pytest.fixture(scope="module")
def secagg(omniglot_dir) -> Iterator[Experiment]:
    params = flower_params(omniglot_dir, secure_aggregation=True)
    with federation(params, load_tiny(params)) as exp:
        yield exp


def test_rounds_equal_local_bit_for_bit_on_one_running_federation(plain) -> None:
    exp, theta0, took0 = plain
    local_exp = Experiment(local_twin(exp.params), exp.data, torch.device("cpu"))
    start = time.perf_counter()
    local0 = local_exp.round(init(local_exp), 0, False, pretraining=True)
    timings = [(time.perf_counter() - start, took0)]
    assert all(torch.equal(local0[k], theta0[k]) for k in local0), "round 0: θ differs from the local engine's"
    assert exp.flower is not None and exp.flower.sup is not None
    children = {name: proc.pid for name, proc in exp.flower.sup.procs.items()}
    start = time.perf_counter()
    local1 = local_exp.round(local0, 1, False, pretraining=True)
    middle = time.perf_counter()
    flower1 = exp.round(theta0, 1, False, pretraining=True)
    timings.append((middle - start, time.perf_counter() - middle))
    assert all(torch.equal(local1[k], flower1[k]) for k in local1), "round 1: θ differs from the local engine's"
    assert {name: proc.pid for name, proc in exp.flower.sup.procs.items()} == children, (
        "round 1 restarted processes of the federation"
    )
    assert (
        len(children) == 2 + 2 * exp.params.federation.users
    )  # SuperLink, `flwr run`, and per user a SuperNode and its worker
    print("seconds per round (local, flower):", timings)


def test_a_round_past_its_timeout_is_a_clear_error_and_the_federation_serves_on(plain) -> None:
    exp, theta0, _ = plain
    assert exp.flower is not None
    with (
        flower_settings(exp.flower, round_timeout=0.01),
        pytest.raises(
            FedmetaError,
            match=r"^federated round pretrain-5 on Flower failed after \d+ s: TimeoutError: "
            r".*federation.flower.round_timeout.*rerun to resume$",
        ),
    ):
        exp.round(theta0, 5, False, pretraining=True)
    assert exp.flower.sup is not None and exp.flower.sup.procs["run"].poll() is None


def test_a_nan_update_sent_over_flower_is_rejected_on_receipt_naming_its_user(plain) -> None:
    """A δ with NaN travels through Flower's messages like any other and is refused on receipt by the same
    `federation.check_update` as on the local engine, with its message, naming the user; the federation serves on.
    One NaN in θ makes every user's δ NaN, so real SuperNodes send it without any hook in their workers."""
    exp, theta, _ = plain
    assert exp.flower is not None and exp.flower.sup is not None
    bad = {k: v.clone() for k, v in theta.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    with pytest.raises(
        FedmetaError,
        match=r"^round 2 diverged: user \d+'s update holds NaN or infinite weights; "
        r"likely cause: profiles\.tiny\.inner_lr",
    ) as err:
        exp.round(bad, 2, False)
    assert "\n" not in str(err.value)
    assert exp.flower.sup.procs["run"].poll() is None


def test_a_bound_port_is_one_line_naming_it(omniglot_dir, tiny_data) -> None:
    params = flower_params(omniglot_dir)
    port = params.federation.flower.port
    with socket.socket() as s:
        s.bind((processes.HOST, port))
        s.listen()
        exp = Experiment(params, tiny_data, torch.device("cpu"))
        with pytest.raises(
            FedmetaError, match=rf"^federation.flower.port: SuperLink port {port} on 127.0.0.1 cannot be bound"
        ) as err:
            exp.round(init(exp), 0, False, pretraining=True)
    assert "\n" not in str(err.value)
    assert exp.flower is not None and exp.flower.sup is None


def test_a_port_in_time_wait_from_a_stopped_federation_is_free(omniglot_dir) -> None:
    """The previous stage's SuperLink closed its connections first, so its port lingers in TIME_WAIT for a
    minute: the next stage's federation must still start on it."""
    port = flower_params(omniglot_dir).federation.flower.port
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink's gRPC server binds
        listener.bind((processes.HOST, port))
        listener.listen()
        with socket.create_connection((processes.HOST, port)) as peer:
            conn, _ = listener.accept()
            conn.close()  # the server side closes first: its end of the connection enters TIME_WAIT
            peer.recv(1)
    processes.check_port(port, "SuperLink")


def kill_when_training(sup: processes.Supervisor, name: str, limit: float, orphans: list[int]) -> None:
    """SIGKILL SuperNode `name` alone once its ClientApp process runs, mid-round, as a crash would: its ClientApp
    is left to init, and its pid goes to `orphans`."""
    proc, deadline = sup.procs[name], time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            apps = [
                c.pid
                for c in psutil.Process(proc.pid).children(recursive=True)
                if "flwr-clientapp" in " ".join(c.cmdline())
            ]
            if apps:
                orphans += apps
                break
        except psutil.Error:
            pass
        time.sleep(0.02)
    proc.kill()


def test_a_supernode_killed_mid_round_leaves_the_next_users_in_order(plain) -> None:
    """M_r = 3 > M_min = 2: the first user in fedmeta's order loses its SuperNode while it trains; the round
    completes, within a bounded time, with the next two, exactly as the local engine computes them without it."""
    exp, theta, _ = plain  # every SuperNode has joined and is known since round 0
    selection = select(exp.params, "1", False)
    victim = selection.order[0]
    assert exp.flower is not None and exp.flower.sup is not None
    orphans: list[int] = []
    killer = threading.Thread(target=kill_when_training, args=(exp.flower.sup, f"supernode{victim}", 60.0, orphans))
    killer.start()
    started = time.monotonic()
    got = exp.round(theta, 1, False)
    took = time.monotonic() - started
    killer.join()
    print(f"round with a SuperNode killed mid-round: {took:.1f} s")
    assert took < 60.0
    applied = selection.applied_given({victim})
    assert applied is not None and victim not in applied
    local = Experiment(local_twin(exp.params), exp.data, torch.device("cpu"))
    work = LocalWork("1", applied, [local.local_model(theta, u, 1, "1", False) for u in applied])
    want = local.round(theta, 1, False, work=work)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert orphans, "the SuperNode was killed before its ClientApp ran"
    # an orphan still running carries the federation's mark, by which `stop_all` (and the fixture's check) find it
    marked = {p.pid for p in processes.marked(exp.flower.sup.mark)}
    assert set(processes.pids_alive(orphans)) <= marked


def test_secagg_plus_equals_the_plain_mean_within_quantization_and_lets_the_boosted_update_through(secagg) -> None:
    """Flower's SecAgg+ on the attack round (the attacker's boosted δ and M_min − 1 benign ones): θ' equals the
    local engine's plain mean within SecAgg+'s quantization error, and with the default range nothing is clipped."""
    exp = secagg
    plain_exp = Experiment(local_twin(exp.params, secure_aggregation=False), exp.data, torch.device("cpu"))
    theta = init(exp)
    got = exp.round(theta, 0, False, with_attacker=True)
    assert exp.flower is not None
    stats = exp.flower.secagg[-1]
    want = plain_exp.round(theta, 0, False, with_attacker=True)
    c = stats["clipping_range"]
    assert c == 8.0 * exp.params.attack.boost
    step = 2 * c / 2**22  # one quantization step of SecAgg+'s default 2^22 levels; stochastic rounding errs by less
    err = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    moved = max(float((want[k].double() - theta[k].double()).abs().max()) for k in want)
    print(
        f"SecAgg+ vs plain mean: max |Δθ| {err:.3g} (quantization step {step:.3g}); "
        f"the round moved θ by up to {moved:.3g}; "
        f"clipped share {stats['clipped_share']}; per user {stats['per_user']}"
    )
    assert err <= step + 1e-6
    assert stats["clipped_share"] == 0.0
    assert exp.params.federation.attacker in stats["per_user"]


def test_secagg_plus_reports_the_coordinates_its_range_clips(secagg) -> None:
    """A range below the boosted update's scale silently weakens it: the engine reports the share clipped."""
    exp = secagg
    if exp.flower is None:  # run alone: start the federation as the first test would
        exp.flower = FlowerDeployment(exp.params, exp.data)
    with flower_settings(exp.flower, clipping_range=1e-3):
        exp.round(init(exp), 0, False, pretraining=True)
    stats = exp.flower.secagg[-1]
    print("clipped share at clipping_range 1e-3:", stats["clipped_share"])
    assert stats["clipping_range"] == 1e-3
    assert 0.0 < stats["clipped_share"] <= 1.0


def test_a_worker_refuses_a_round_of_another_prepared_dataset(tiny_data: FederatedData, tiny_params) -> None:
    """A node across machines loads its own checkout's dataset: a round of a stage prepared from another one is
    refused, naming both digests, before any training."""
    trainer = Trainer(1, private_copy(tiny_data, 1, 0), tiny_data.digest(), torch.device("cpu"))
    other = "0" * 64
    with pytest.raises(
        FedmetaError,
        match=rf"^user 1's images come from another prepared dataset than the stage's "
        rf"\(digest {tiny_data.digest()[:12]}, the stage's {other[:12]}\)",
    ):
        trainer.answer({"data": other, "params": tiny_params.model_dump_json()})
    assert trainer.exp is None
