"""One user's side of a federation across machines: its worker and SuperNode, joined to the SuperLink that
federation.flower.superlink names (docs/flower.md, *Across machines*).

`fedmeta node USER` runs on the user's machine, from a checkout with the
federation's params.yaml and data/prepared/dataset.pt. The worker is handed
only this user's images (as on one machine), and refuses the rounds of a
stage whose prepared dataset is another one. It serves every stage the
SuperLink runs until stopped (Ctrl-C, SIGTERM), and then leaves no process.
"""

from __future__ import annotations

import shutil
import signal
import socket as pysocket
import tempfile
import time
from pathlib import Path

from fedmeta import config, runtime
from fedmeta.engine import processes
from fedmeta.engine.deployment import (
    START_TIMEOUT_S,
    flower_env,
    link_args,
    root_certificates,
    start_supernode,
    start_worker,
)
from fedmeta.errors import FedmetaError
from fedmeta.splits import FederatedData


def main(user: int, auth_key: Path | None, params_path: Path = Path("params.yaml")) -> None:
    params = config.load(params_path)
    fed = params.federation
    if fed.flower.superlink is None:
        raise FedmetaError(
            f"{params_path}: federation.flower.superlink is null; a node joins a running SuperLink: "
            "set it to the SuperLink's host:port"
        )
    if not 0 <= user < fed.users:
        raise FedmetaError(f"USER: {user} is not a user of this federation; allowed: 0 to {fed.users - 1}")
    link = link_args(fed.flower.superlink, root_certificates(fed.flower.root_certificates))
    if auth_key is not None:
        if not auth_key.is_file():
            raise FedmetaError(f"--auth-key: {auth_key}: no such file")
        link += ["--auth-supernode-private-key", str(auth_key.resolve())]
    _reach(fed.flower.superlink)
    data = FederatedData.load(runtime.PREPARED, params)
    folder = Path(tempfile.mkdtemp(prefix=f"fedmeta-node{user}-"))  # 0700: the user's images and socket
    signal.signal(signal.SIGTERM, _stop)  # stopping a node is how it ends: as Ctrl-C, exit 0
    sup = processes.Supervisor(folder / "logs", flower_env(folder / "home"))
    try:
        (folder / "params.json").write_text(params.model_dump_json())
        socket = start_worker(sup, folder, user, data, fed.attacker, folder / "params.json", data.digest())
        del data
        sup.wait_file(f"worker{user}", socket, START_TIMEOUT_S)
        start_supernode(sup, user, link, processes.free_port(), socket)
        print(f"user {user}: SuperNode of {fed.flower.superlink} started; Ctrl-C stops it", flush=True)
        while True:
            for name, proc in sup.procs.items():
                if proc.poll() is not None:
                    raise FedmetaError(f"user {user}: {name} exited with code {proc.returncode}: {sup.log_tail(name)}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"user {user}: stopped", flush=True)
    finally:
        sup.stop_all()
        shutil.rmtree(folder, ignore_errors=True)


REACH_S = 15.0  # how long a node waits for its SuperLink to accept connections (Flower's SuperNode retries forever)


def _reach(address: str) -> None:
    """The SuperLink must accept a TCP connection within REACH_S seconds: a SuperNode that cannot reach it waits
    silently, so the node would print "started" and then hang."""
    host, _, port = address.rpartition(":")
    deadline, why = time.monotonic() + REACH_S, "no answer"
    while time.monotonic() < deadline:
        try:
            pysocket.create_connection(
                (host.strip("[]"), int(port)), timeout=max(0.1, deadline - time.monotonic())
            ).close()
            return
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
        time.sleep(0.5)
    raise FedmetaError(
        f"federation.flower.superlink: nothing accepts connections at {address} within {REACH_S:.0f} s ({why}); "
        "start the SuperLink first, or fix the address"
    )


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
