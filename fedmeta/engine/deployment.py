"""Flower's deployment runtime on this machine: one SuperLink, M SuperNodes and M workers, one `flwr run` per stage.

Started at the first round, kept for every later round of the stage, and
stopped by `close` (on success, on error, on Ctrl-C or SIGTERM through
atexit): no process outlives the stage. Each SuperNode and its worker get a
dataset file holding only their own user's images, so a client cannot train
on anyone else's data even by mistake.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmeta import checkpoint, federation, tracking
from fedmeta.checkpoint import Resume
from fedmeta.config import Config
from fedmeta.engine import processes
from fedmeta.errors import Diverged, FedmetaError
from fedmeta.model import Theta
from fedmeta.splits import FederatedData

APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmeta-round"
version = "1.0.0"
description = "The federated rounds of one fedmeta stage (fedmeta.engine.flower)"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "fedmeta"

[tool.flwr.app.components]
serverapp = "fedmeta.engine.flower:server"
clientapp = "fedmeta.engine.client:{clientapp}"

[tool.flwr.app.config]
exchange = ""
"""
START_TIMEOUT_S = 60.0
EXIT_MARGIN_S = 60.0  # beyond round_timeout: the ServerApp's own deadline fires first
POLL_S = 0.02
TASK_POLL_S = "0.2"  # how often each SuperExec asks for a ClientApp or ServerApp to launch (Flower's default: 1 s)


def flower_env(home: Path) -> dict[str, str]:
    """CI-safe: no telemetry, no `uv sync` of the app's dependencies, a private FLWR_HOME, this venv's CLIs;
    SuperExecs that poll for tasks often, since every message is a process launch waiting on that poll."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=TASK_POLL_S,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def private_copy(data: FederatedData, user: int, attacker: int) -> FederatedData:
    """The dataset as user `user` holds it: every image it does not own zeroed (indices stay valid)."""
    if user == attacker:
        idx = [*(data.train_idx[c] for c in data.user_classes[user]), data.attack_train_idx, data.attacker_target_idx]
    else:
        idx = [data.train_idx[c] for c in data.user_data(user, include_backdoor=True)]
    own = torch.cat(idx)
    images = torch.zeros_like(data.images)
    images[own] = data.images[own]
    fields = {k: v for k, v in vars(data).items() if k != "images"}
    return FederatedData(images=images, **fields)


def root_certificates(path: str | None) -> Path | None:
    """The CA certificate the SuperLink's TLS certificate is verified against (federation.flower.root_certificates),
    or None: an unencrypted connection."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FedmetaError(f"federation.flower.root_certificates: {path}: no such file")
    return resolved


def link_args(superlink: str, ca: Path | None) -> list[str]:
    """How a SuperNode reaches the SuperLink."""
    return [*(["--root-certificates", str(ca)] if ca is not None else ["--insecure"]), "--superlink", superlink]


def start_worker(
    sup: processes.Supervisor,
    folder: Path,
    user: int,
    data: FederatedData,
    attacker: int,
    params_json: Path,
    digest: str,
) -> Path:
    """User `user`'s worker, given a dataset file with only its own images; the socket it will listen on once
    loaded (fedmeta.engine.worker)."""
    data_path, socket = folder / f"user{user}.pt", folder / f"worker{user}.sock"
    private_copy(data, user, attacker).save(data_path, now=True)
    argv = [sys.executable, "-m", "fedmeta.engine.worker", str(user), str(params_json), str(data_path), str(socket)]
    sup.start(f"worker{user}", [*argv, digest])
    return socket


def start_supernode(sup: processes.Supervisor, user: int, link: list[str], port: int, socket: Path) -> None:
    """User `user`'s SuperNode: `link` says how it reaches the SuperLink; its ClientApps reach the worker at
    `socket`, and its ClientAppIo API listens on 127.0.0.1:`port`."""
    argv = ["flower-supernode", *link, "--host", processes.HOST, "--port", str(port)]
    sup.start(f"supernode{user}", [*argv, "--node-config", f"user={user} worker='{socket}'"])


DIVERGED = f"{Diverged.__name__}: "  # how the ServerApp's error file starts when the round diverged


class FlowerDeployment:
    """One stage's Flower federation: the SuperLink, each user's SuperNode and worker (or a running SuperLink's),
    and `flwr run` serving the stage's rounds."""

    def __init__(self, params: Config, data: FederatedData) -> None:
        self.params, self.data = params, data
        self.sup: processes.Supervisor | None = None
        self.dir: Path | None = None
        self.secagg: list[dict] = []  # per round under SecAgg+: clipping range, share clipped, per user
        self.jobs = 0  # rounds handed to the ServerApp since start: the next job's number
        self.digest = data.digest()  # every worker checks that its user's data was cut from this dataset

    @property
    def ports(self) -> list[int]:
        base = self.params.federation.flower.port
        return [base, *(base + 1 + u for u in range(self.params.federation.users))]

    def start(self) -> None:
        fl = self.params.federation.flower
        if fl.superlink is None:
            for i, port in enumerate(self.ports):
                processes.check_port(port, "SuperLink" if i == 0 else f"SuperNode {i - 1}")
        ca = root_certificates(fl.root_certificates)
        self.dir = Path(tempfile.mkdtemp(prefix="fedmeta-flower-"))
        atexit.register(self.close)
        processes.terminate_on_sigterm()
        home, app, exchange = self.dir / "home", self.dir / "app", self.dir / "exchange"
        for d in (home, app, exchange):
            d.mkdir()
        address = fl.superlink or f"{processes.HOST}:{self.ports[0]}"
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "fedmeta"\n\n[superlink.fedmeta]\n'
            f'address = "{address}"\n' + (f'root-certificates = "{ca}"\n' if ca is not None else "insecure = true\n")
        )
        (app / "pyproject.toml").write_text(
            APP_TOML.replace("{clientapp}", "secure_client" if self.params.federation.secure_aggregation else "client")
        )
        (exchange / "params.json").write_text(self.params.model_dump_json())
        run = tracking.current()
        if run is not None:
            run.tag("engine", "flower")
        self.sup = processes.Supervisor(self.dir / "logs", flower_env(home))
        sockets = self._start_deployment(exchange / "params.json") if fl.superlink is None else []
        self.sup.start(
            "run", ["flwr", "run", str(app), "fedmeta", "--stream", "--run-config", f"exchange='{exchange}'"]
        )
        for user, socket in enumerate(sockets):
            self.sup.wait_listening(f"supernode{user}", self.ports[1 + user], START_TIMEOUT_S)
            self.sup.wait_file(f"worker{user}", socket, START_TIMEOUT_S)
        self.jobs = 0

    def _start_deployment(self, params_json: Path) -> list[Path]:
        """The SuperLink, then each user's worker and SuperNode, on 127.0.0.1; the workers' sockets (a user is
        ready when its SuperNode listens and its socket exists)."""
        assert self.dir is not None and self.sup is not None
        port, fed = self.ports[0], self.params.federation
        self.sup.start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                processes.HOST,
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
        )
        sockets = [
            start_worker(self.sup, self.dir, user, self.data, fed.attacker, params_json, self.digest)
            for user in range(fed.users)
        ]
        self.sup.wait_listening("superlink", port, START_TIMEOUT_S)
        for user in range(fed.users):
            link = link_args(f"{processes.HOST}:{port}", None)
            start_supernode(self.sup, user, link, self.ports[1 + user], sockets[user])
        return sockets

    def round(
        self, theta: Theta, rnd: int, key: str, include_backdoor: bool, with_attacker: bool, resume: Resume | None
    ) -> federation.Served:
        """One job for the stage's ServerApp; θ' (on θ's device) and the filtering rule's screening read back from the
        exchange folder. A ServerApp that stops or stalls past the round's deadline takes the federation down with
        it: the next round starts afresh."""
        if self.sup is None:
            self.start()
        assert self.dir is not None and self.sup is not None
        exchange, timeout, seq = self.dir / "exchange", self.params.federation.flower.round_timeout, self.jobs
        self.jobs += 1
        device = next(iter(theta.values())).device
        job = {
            "theta": {k: v.cpu() for k, v in theta.items()},
            "round": rnd,
            "key": key,
            "include_backdoor": include_backdoor,
            "with_attacker": with_attacker,
            "params": self.params.model_dump_json(),
            "max_weight": float(len(self.data.images)),
            "data": self.digest,
        }
        if resume is not None:
            job["resume"] = {
                "path": str(resume.path.resolve()),
                "every": resume.every,
                "fingerprint": resume.fingerprint,
            }
        checkpoint.save(exchange / f"job-{seq}.pt", job, now=True)
        result, error, run = exchange / f"result-{seq}.pt", exchange / f"error-{seq}.txt", self.sup.procs["run"]
        started = time.monotonic()
        where = f"federated round {key} on Flower"
        while not result.is_file():
            if error.is_file():
                reason = error.read_text().splitlines()[0]
                if reason.startswith(DIVERGED):  # the server round's own message, as on the local engine
                    raise Diverged(reason.removeprefix(DIVERGED))
                hint = (
                    " (federation.flower.round_timeout); resumable state is kept: rerun to resume"
                    if reason.startswith("TimeoutError")
                    else ""
                )
                raise FedmetaError(f"{where} failed after {time.monotonic() - started:.0f} s: {reason}{hint}")
            if run.poll() is not None:
                tail = self.sup.log_tail("run")
                self.close()
                raise FedmetaError(f"{where}: `flwr run` exited with code {run.returncode} without a result: {tail}")
            if time.monotonic() - started > timeout + EXIT_MARGIN_S:
                self.close()
                raise FedmetaError(
                    f"{where} timed out after {timeout + EXIT_MARGIN_S:.0f} s (federation.flower.round_timeout); "
                    "resumable state is kept: rerun to resume"
                )
            time.sleep(POLL_S)
        self._report(result, rnd, key)
        served = checkpoint.load(result, ("theta", "users"))
        kept = served.get("kept")
        screening = None if kept is None else federation.Screening(list(served["users"]), list(kept))
        return federation.Served(checkpoint.load_theta(result, device), screening)

    def _report(self, result: Path, rnd: int, key: str) -> None:
        """Under SecAgg+, the share of uploaded coordinates its ±clipping_range clipped: kept in `secagg`,
        an MLflow metric of the stage's run (secagg_clipped_share, step = round), and a warning when any was."""
        stats = checkpoint.load(result, ("theta", "users")).get("secagg")
        self.secagg.append({"key": key, **stats} if stats else {})
        if not stats:
            return
        run = tracking.current()
        if run is not None:
            run.metrics({"secagg_clipped_share": stats["clipped_share"]}, step=rnd)
        if stats["clipped_share"] > 0:
            worst = max(stats["per_user"].items(), key=lambda kv: kv[1]["clipped"])
            print(
                f"warning: federated round {key}: SecAgg+ clipped {stats['clipped_share']:.2%} of the uploaded "
                f"coordinates to ±{stats['clipping_range']:g} (user {worst[0] + 1}: {worst[1]['clipped']}, "
                f"max |coordinate| {worst[1]['max_abs']:.3g}); "
                "raise federation.flower.clipping_range",
                file=sys.stderr,
            )

    def pids(self) -> list[int]:
        """Every process this federation runs now, descendants included (tests check they all go)."""
        return [pid for proc in (self.sup.procs.values() if self.sup else []) for pid in processes.pid_tree(proc.pid)]

    def close(self) -> None:
        if self.sup is not None:
            self.sup.stop_all()
            self.sup = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        atexit.unregister(self.close)
