"""fedmeta's ClientApps: thin, because Flower 1.42 starts a fresh `flwr-clientapp` for every message.

They import flwr and numpy only, never torch: training happens in the user's
long-lived worker (fedmeta.engine.worker, `worker` in the node config), which
gets θ as the float32 arrays that arrived and returns δ the same way (exact).
`secure_client` wraps the same call in Flower's secaggplus_mod
(federation.secure_aggregation): the server sees only the masked sum.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Client

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

client = ClientApp()
secure_client = ClientApp(mods=[secaggplus_mod])  # federation.secure_aggregation: Flower's SecAgg+ masks each upload


def _on_worker(context: Context, theta: dict[str, np.ndarray], cfg: dict) -> dict:
    """The worker's answer for this round: δ (name → array), user, size, weight; its error raised here becomes
    Flower's error reply, so the server counts the user as failed with the worker's reason."""
    with Client(str(context.node_config["worker"]), family="AF_UNIX") as conn:
        conn.send({"theta": theta, **cfg})
        reply = conn.recv()
    if "error" in reply:
        raise RuntimeError(f"user {context.node_config['user']}'s local update failed: {reply['error']}")
    return reply


@client.query()
def identify(msg: Message, context: Context) -> Message:
    """Which user this SuperNode serves: the server addresses users, Flower addresses node ids."""
    return Message(RecordDict({"node": ConfigRecord({"user": int(context.node_config["user"])})}), reply_to=msg)


secure_client.query()(identify)


@client.train()
def train(msg: Message, context: Context) -> Message:
    theta = {k: a.numpy() for k, a in msg.content["theta"].items()}
    out = _on_worker(context, theta, dict(msg.content["round"]))
    delta = ArrayRecord({k: Array(v) for k, v in out["delta"].items()})
    meta = ConfigRecord({"user": out["user"], "size": out["size"]})
    return Message(RecordDict({"delta": delta, "meta": meta}), reply_to=msg)


@secure_client.train()
def train_secure(msg: Message, context: Context) -> Message:
    """SecAgg+'s 'collect masked vectors' stage calls this inside secaggplus_mod: δ goes back as the legacy
    FitRes the mod quantizes and masks. The metrics (in the clear) say how many of its coordinates SecAgg+'s
    ±clipping_range will clip."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = dict(fitins.config)
    theta = dict(zip(json.loads(str(cfg.pop("keys"))), parameters_to_ndarrays(fitins.parameters)))
    out = _on_worker(context, theta, cfg)
    # what the mod will apply: ±c on (weight / max_weight)·δ, quantized
    sa = context.state.config_records[RECORD_KEY_STATE]
    q = int(sa["target_range"])
    ratio = round(out["weight"] / float(sa["max_weight"]) * q) / q
    arrays = list(out["delta"].values())
    clipped = sum(int((np.abs(a * ratio) > float(sa["clipping_range"])).sum()) for a in arrays)
    metrics = {
        "user": out["user"],
        "clipped": clipped,
        "coordinates": sum(a.size for a in arrays),
        "max_abs": float(max(np.abs(a).max() for a in arrays)),
    }
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), out["weight"], metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
