"""fedmeta's round as a Flower app: the ServerApp selects, waits and aggregates; ClientApps train.

The SuperLink runs `server` once per round (one `flwr run`); it reads the round
from the exchange folder the engine wrote (θ, round, variant), asks the
selected users' SuperNodes, and writes θ' back. Clients send δ_i, never
weights, so the boost λ and the aggregator act on updates as in `local`.
Tensors travel as float32 numpy arrays (np.save, exact), so θ stays bit-identical.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmeta import checkpoint, config, runtime
from fedmeta.engine import plan
from fedmeta.model import Params as Theta

server = ServerApp()
client = ClientApp()

POLL_S = 0.05


def to_record(theta: Theta) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in theta.items()})


def from_record(record: ArrayRecord) -> Theta:
    return {k: torch.from_numpy(a.numpy()) for k, a in record.items()}


def load_params(path: str) -> config.Params:
    return config.parse(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- client side


@client.query()
def identify(msg: Message, context: Context) -> Message:
    """Which user this SuperNode serves: the server addresses users, Flower addresses node ids."""
    return Message(RecordDict({"node": ConfigRecord({"user": int(context.node_config["user"])})}), reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    """One user's local Reptile from the θ received: benign, or the attacker's boosted training."""
    from fedmeta.checkpoint import Resume
    from fedmeta.experiment import Lab
    from fedmeta.splits import FederatedData

    node = context.node_config
    params = load_params(str(node["params"]))
    runtime.configure(params)
    user = int(node["user"])
    cfg = msg.content["round"]
    lab = Lab(params, FederatedData.load(Path(str(node["data"]))), runtime.device_of(params))
    theta = {k: v.to(lab.device) for k, v in from_record(msg.content["theta"]).items()}
    resume = Resume(Path(str(cfg["resume_path"])), int(cfg["resume_every"]), str(cfg["resume_fingerprint"])) if cfg["resume_path"] else None
    include = bool(cfg["include_backdoor"])
    delta = lab.local_update(theta, user, int(cfg["round"]), str(cfg["key"]), include, resume)
    reply = RecordDict({"delta": to_record(delta), "meta": ConfigRecord({"user": user, "size": lab._size(user, include)})})
    return Message(reply, reply_to=msg)


# ---------------------------------------------------------------- server side


def _users_of_nodes(grid: Grid, exchange: Path, expected: int, deadline: float) -> dict[int, int]:
    """node id → user: asked once (all M SuperNodes must have joined) and remembered across rounds."""
    known_path = exchange / "nodes.json"
    known = {int(k): v for k, v in json.loads(known_path.read_text()).items()} if known_path.exists() else {}
    while True:
        nodes = set(grid.get_node_ids())
        if known and nodes <= set(known):
            return known
        if len(nodes) >= expected or known:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {expected} SuperNodes joined the SuperLink")
        time.sleep(POLL_S)
    ask = [Message(RecordDict(), n, "query") for n in sorted(nodes - set(known))]
    for reply in grid.send_and_receive(ask, timeout=max(1.0, deadline - time.monotonic())):
        if not reply.has_error():
            known[reply.metadata.src_node_id] = int(reply.content["node"]["user"])
    missing = sorted(set(range(expected)) - set(known.values()))
    if missing:
        raise TimeoutError(f"the SuperNodes of users {missing} did not identify themselves in time")
    known_path.write_text(json.dumps(known))
    return known


def _collect(grid: Grid, sent: dict[str, int], selection: plan.Selection, deadline: float) -> tuple[list[int], dict[int, Message]]:
    """Replies until the first M_min users in fedmeta's order that do answer have all answered; an error
    reply (a SuperNode gone: the SuperLink answers for it) moves the next user up."""
    replies: dict[int, Message] = {}
    failed: dict[int, str] = {}
    pending = dict(sent)
    while True:
        applied = selection.applied_given(set(failed))
        if applied is None:
            why = "; ".join(f"user {u}: {reason}" for u, reason in sorted(failed.items()))
            raise RuntimeError(f"too few users answered ({selection.need} of {selection.order} needed, plus {selection.always}): {why}")
        if all(u in replies for u in applied):
            return applied, replies
        if time.monotonic() > deadline:
            waiting = sorted(u for u in applied if u not in replies)
            raise TimeoutError(f"users {waiting} did not answer in time")
        for reply in grid.pull_messages(list(pending)):
            user = pending.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                failed[user] = reply.error.reason.strip().splitlines()[-1][:300]
            else:
                replies[user] = reply
        time.sleep(POLL_S)


@server.main()
def main(grid: Grid, context: Context) -> None:
    exchange = Path(str(context.run_config["exchange"]))
    try:
        _serve(grid, exchange)
    except Exception as exc:  # the engine reads the reason; Flower's own log keeps the traceback
        (exchange / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise


def _serve(grid: Grid, exchange: Path) -> None:
    job = checkpoint.load(exchange / "round.pt", ("theta", "round", "key", "include_backdoor", "with_attacker", "timeout"))
    params = load_params(str(exchange / "params.json"))
    deadline = time.monotonic() + float(job["timeout"])
    users = _users_of_nodes(grid, exchange, params.federation.users, deadline)
    node_of = {u: n for n, u in users.items()}
    selection = plan.select(params, job["key"], job["with_attacker"])
    theta: Theta = job["theta"]
    resume = job.get("resume") or {"path": "", "every": 1, "fingerprint": ""}
    messages, sent = [], []
    for user in selection.order + selection.always:
        cfg = {"round": int(job["round"]), "key": job["key"], "include_backdoor": bool(job["include_backdoor"])}
        mine = user in selection.always
        cfg |= {"resume_path": resume["path"] if mine else "", "resume_every": int(resume["every"]), "resume_fingerprint": resume["fingerprint"]}
        content = RecordDict({"theta": to_record(theta), "round": ConfigRecord(cfg)})
        messages.append(Message(content, node_of[user], "train", group_id=job["key"]))
        sent.append(user)
    ids = list(grid.push_messages(messages))
    applied, replies = _collect(grid, {i: u for i, u in zip(ids, sent) if i}, selection, deadline)
    deltas = [from_record(replies[u].content["delta"]) for u in applied]
    sizes = [int(replies[u].content["meta"]["size"]) for u in applied]
    checkpoint.save(exchange / "result.pt", {"theta": plan.combine(params, theta, deltas, sizes, job["key"]), "users": applied})

