"""One user's trainer, alive for a whole stage beside that user's SuperNode.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process. Loading
torch, fedmeta and the user's dataset there would be paid per message; the
worker loads them once and the ClientApp (fedmeta.engine.client) only hands
it θ and gets δ back over a Unix socket in the federation's private (0700)
folder. It runs `Experiment.local_model` and `Experiment.upload`, the local engine's own code, on
the same float32 arrays, so θ stays bit-identical. Each round brings the
stage's configuration (a worker of `fedmeta node` serves many stages) and
the digest of the stage's prepared dataset, which must be the one this
user's images were cut from.

    python -m fedmeta.engine.worker USER PARAMS_JSON DATASET SOCKET DIGEST
"""

from __future__ import annotations

import json
import sys
import traceback
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from fedmeta import config, runtime
from fedmeta.checkpoint import Resume
from fedmeta.errors import FedmetaError
from fedmeta.experiment import Experiment
from fedmeta.splits import FederatedData


def update(exp: Experiment, user: int, request: dict) -> dict:
    """What `user` uploads for the request's round (`Experiment.upload`: the attacker's boosted δ, resumable;
    under SecAgg+ an honest client's own clipping), its dataset size, and the weight SecAgg+ multiplies it by."""
    theta = {k: torch.from_numpy(a).to(exp.device) for k, a in request["theta"].items()}
    resume = None
    if request["resume_path"]:  # only the attacker's training is resumable
        resume = Resume(Path(request["resume_path"]), int(request["resume_every"]), str(request["resume_fingerprint"]))
    include = bool(request["include_backdoor"])
    local = exp.local_model(theta, user, int(request["round"]), str(request["key"]), include, resume)
    delta, size = exp.upload(theta, user, local), exp.dataset_size(user, include)
    arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in delta.items()}
    weight = 1 if exp.params.federation.weighting == "uniform" else size
    return {"delta": arrays, "user": user, "size": size, "weight": weight}


class Trainer:
    """The user's data, loaded once, and an Experiment for the configuration of the stage now asking."""

    def __init__(self, user: int, data: FederatedData, digest: str, device: torch.device) -> None:
        self.user, self.data, self.digest, self.device = user, data, digest, device
        self.exp: Experiment | None = None
        self.params_json = ""

    def answer(self, request: dict) -> dict:
        if request["data"] != self.digest:
            raise FedmetaError(
                f"user {self.user}'s images come from another prepared dataset than the stage's "
                f"(digest {self.digest[:12]}, the stage's {str(request['data'])[:12]}): start its node from a "
                "checkout with the stage's data/prepared/dataset.pt"
            )
        if request["params"] != self.params_json:
            self.exp = Experiment(config.parse(json.loads(request["params"])), self.data, self.device)
            self.params_json = request["params"]
        assert self.exp is not None
        return update(self.exp, self.user, request)


def serve(user: int, params_path: Path, data_path: Path, address: str, digest: str) -> None:
    """Answer requests one at a time until stopped; the socket appears only once everything is loaded (ready)."""
    params = config.parse(json.loads(params_path.read_text()))
    runtime.configure(params)
    trainer = Trainer(user, FederatedData.load(data_path), digest, runtime.device_of(params))
    with Listener(address, family="AF_UNIX") as listener:
        while True:
            with listener.accept() as conn:
                try:
                    request = conn.recv()
                except EOFError:  # the ClientApp left before asking
                    continue
                try:
                    reply = trainer.answer(request)
                except Exception as exc:  # the ClientApp turns it into Flower's error reply; the traceback stays here
                    traceback.print_exc()
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                try:
                    conn.send(reply)
                except OSError:  # its SuperNode stopped mid-round: the user failed, the next request is served
                    print(f"user {user}: the ClientApp left before its reply", file=sys.stderr)


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5])
