"""fedmeta's round as a Flower ServerApp: `federation.server_round` with Flower as its transport; ClientApps
(fedmeta.engine.client) train.

One `flwr run` per stage: the ServerApp stays up and serves the rounds the
engine writes to the exchange folder as job-<n>.pt (θ, round, the Config),
one after the other, answering with result-<n>.pt (θ') or error-<n>.txt, so
neither `flwr run` nor torch's import is paid per round. It asks the selected
users' SuperNodes and hands the δ_i they send to the same server round as the local engine's.
Tensors travel as float32 numpy arrays (exact), so θ stays bit-identical.
With federation.secure_aggregation the round runs Flower's SecAggPlusWorkflow
(`_serve_secure`) against `secure_client`: the server sees only the mean.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmeta import checkpoint, config, federation, secure, seeding
from fedmeta.atomic import write_text
from fedmeta.model import Theta

server = ServerApp()

POLL_S = 0.05
LIVENESS_S = 0.5  # how often the ServerApp asks which SuperNodes are still online


def to_record(theta: Theta) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in theta.items()})


def from_record(record: ArrayRecord) -> Theta:
    return {k: torch.from_numpy(a.numpy()) for k, a in record.items()}


# ---------------------------------------------------------------- server side


def _users_of_nodes(grid: Grid, known: dict[int, int], expected: int, deadline: float) -> dict[int, int]:
    """node id → user: asked once (all M SuperNodes must have joined), then kept in `known` for the stage's rounds."""
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
    if missing and time.monotonic() < deadline:  # their replies were errors: not a timeout, whatever the round's is
        raise RuntimeError(f"the SuperNodes of users {missing} left the federation before identifying themselves")
    if missing:
        raise TimeoutError(f"the SuperNodes of users {missing} did not identify themselves in time")
    return known


def _collect(
    grid: Grid,
    sent: dict[str, int],
    refused: list[int],
    selection: federation.Selection,
    node_of: dict[int, int],
    deadline: float,
) -> tuple[list[int], dict[int, Message]]:
    """Replies until the first M_min users in fedmeta's order that do answer have all answered.

    A user fails, and the next one moves up, when the SuperLink refused its message (its node was removed),
    answers for it with an error, or its node left the federation (a SuperNode stopped deactivates itself:
    `get_node_ids` drops it at once, without waiting for Flower's 2 × 30 s heartbeat patience). The round
    ends as soon as the applied users have answered: nobody waits for the others."""
    replies: dict[int, Message] = {}
    failed: dict[int, str] = {u: "the SuperLink refused the message (SuperNode not registered)" for u in refused}
    pending = dict(sent)
    checked = 0.0
    while True:
        applied = selection.applied_given(set(failed))
        if applied is None:
            why = "; ".join(f"user {u}: {reason}" for u, reason in sorted(failed.items()))
            raise RuntimeError(
                f"too few users answered ({selection.need} of {selection.order} needed, plus {selection.always}): {why}"
            )
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
        if time.monotonic() - checked > LIVENESS_S and pending:
            online, checked = set(grid.get_node_ids()), time.monotonic()
            for mid, user in list(pending.items()):
                if node_of[user] not in online:
                    pending.pop(mid)
                    failed[user] = "its SuperNode left the federation"
        time.sleep(POLL_S)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Serve job-0, job-1, … until the engine stops the federation; a failed round is reported and the next served."""
    exchange = Path(str(context.run_config["exchange"]))
    known: dict[int, int] = {}
    for seq in itertools.count():
        job = exchange / f"job-{seq}.pt"
        while not job.is_file():
            if not exchange.is_dir():  # the engine closed the federation; a SuperLink that outlives it gets no orphan
                return
            time.sleep(POLL_S)
        try:
            checkpoint.save(exchange / f"result-{seq}.pt", _serve(grid, job, context, known))
        except Exception as exc:  # the engine reads the reason; the ServerApp's log keeps the traceback
            traceback.print_exc(file=sys.stderr)
            write_text(exchange / f"error-{seq}.txt", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _serve(grid: Grid, job_path: Path, context: Context, known: dict[int, int]) -> dict:
    job = checkpoint.load(job_path, ("theta", "round", "key", "include_backdoor", "with_attacker", "params", "data"))
    params = config.parse(json.loads(job["params"]))
    deadline = time.monotonic() + float(params.federation.flower.round_timeout)
    users = _users_of_nodes(grid, known, params.federation.users, deadline)
    node_of = {u: n for n, u in users.items()}
    theta: Theta = job["theta"]
    resume = job.get("resume") or {"path": "", "every": 1, "fingerprint": ""}
    attacker = params.federation.attacker

    def cfg_of(user: int) -> dict:
        mine = user == attacker
        return {
            "round": int(job["round"]),
            "key": job["key"],
            "include_backdoor": bool(job["include_backdoor"]),
            "resume_path": resume["path"] if mine else "",
            "resume_every": int(resume["every"]),
            "resume_fingerprint": resume["fingerprint"],
            "params": job["params"],
            "data": job["data"],
        }

    if params.federation.secure_aggregation:
        selection = federation.select(params, job["key"], job["with_attacker"])
        return _serve_secure(
            grid,
            context,
            params,
            job,
            theta,
            selection.applied,
            {u: node_of[u] for u in selection.applied},
            cfg_of,
            deadline,
        )

    applied: list[int] = []  # who answered in the end, for the engine's record

    def clients(selection: federation.Selection) -> federation.Uploads:
        """Ask every selected user's SuperNode; the first M_min in fedmeta's order that answer count."""
        messages, sent = [], []
        for user in selection.order + selection.always:
            content = RecordDict({"theta": to_record(theta), "round": ConfigRecord(cfg_of(user))})
            messages.append(Message(content, node_of[user], "train", group_id=job["key"]))
            sent.append(user)
        ids = list(grid.push_messages(messages))
        refused = [u for i, u in zip(ids, sent) if not i]
        users, replies = _collect(grid, {i: u for i, u in zip(ids, sent) if i}, refused, selection, node_of, deadline)
        applied.extend(users)
        deltas = [from_record(replies[u].content["delta"]) for u in users]
        return federation.Uploads(users, deltas, [int(replies[u].content["meta"]["size"]) for u in users])

    new, screening = federation.server_round(params, theta, job["key"], bool(job["with_attacker"]), clients)
    return {"theta": new, "users": applied, **({"kept": screening.kept} if screening is not None else {})}


def _serve_secure(
    grid: Grid,
    context: Context,
    params: config.Config,
    job: dict,
    theta: Theta,
    users: list[int],
    node_of: dict[int, int],
    cfg_of: Callable[[int], dict],
    deadline: float,
) -> dict:
    """The round under Flower's SecAgg+ (SecAggPlusWorkflow on the legacy-strategy path): the M_min users the
    local engine's secure aggregation applies get θ, and the server learns only Σ w_i δ_i / Σ w_i (w_i = 1, or
    the user's size). That step goes through fedmeta's own aggregator as the single "upload" of the secure
    rule (federation.aggregate: θ + step, plus norm_clip's noise if set), so both engines apply one rule."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import (
        MAIN_CONFIGS_RECORD,
        MAIN_PARAMS_RECORD,
        Key,
    )

    keys = list(theta)
    arrays = [v.detach().cpu().contiguous().numpy() for v in theta.values()]
    proxies = {node_of[u]: GridClientProxy(node_of[u], grid, context.run_id) for u in users}
    outcome: dict = {}

    class Round(FedAvg):  # only the two calls SecAggPlusWorkflow makes
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            return [(proxies[node_of[u]], FitIns(parameters, {**cfg_of(u), "keys": json.dumps(keys)})) for u in users]

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            outcome["mean"] = parameters_to_ndarrays(results[0][1].parameters) if results else None
            outcome["metrics"] = [dict(r.metrics) for _, r in results]
            outcome["failures"] = [str(f)[:300] for f in failures]
            return None, {}

    c = clipping_range(params)
    max_weight = 1.0 if params.federation.weighting == "uniform" else float(job["max_weight"])
    manager = SimpleClientManager()
    for proxy in proxies.values():
        manager.register(proxy)
    legacy = LegacyContext(context, strategy=Round(), client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(job["round"]) + 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=0.5,
        clipping_range=c,
        max_weight=max_weight,
        timeout=max(1.0, deadline - time.monotonic()),
    )
    workflow(grid, legacy)
    if outcome.get("mean") is None:
        raise RuntimeError(
            "SecAgg+ halted before aggregating "
            f"(too few users answered: {outcome.get('failures') or 'see the ServerApp log'})"
        )
    step = {
        k: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(theta[k].dtype) for k, a in zip(keys, outcome["mean"])
    }
    fed = params.federation
    new = federation.aggregate(
        theta,
        secure.mask([step], [1.0], lambda i, j: None),
        [1.0],
        fed,
        seeding.generator(params.seed, "aggregate", job["key"]),
    )
    federation.check(params, job["key"], new, masked=True)  # the server saw only the masked sum: no culprit to name
    metrics = outcome["metrics"]
    clipped, coords = sum(int(m["clipped"]) for m in metrics), sum(int(m["coordinates"]) for m in metrics)
    stats = {
        "clipping_range": c,
        "clipped_share": clipped / max(coords, 1),
        "per_user": {int(m["user"]): {"clipped": int(m["clipped"]), "max_abs": float(m["max_abs"])} for m in metrics},
    }
    return {"theta": new, "users": sorted(int(m["user"]) for m in metrics), "secagg": stats}


def clipping_range(params: config.Config) -> float:
    """SecAgg+'s ±c per coordinate: federation.flower.clipping_range, or by default c = λ · 8 (λ = attack.boost,
    at least 1): Flower's default 8 bounds a plain update's |coordinate|, and the boosted update is λ times one."""
    fl = params.federation.flower
    return float(fl.clipping_range) if fl.clipping_range is not None else DEFAULT_RANGE * max(1.0, params.attack.boost)


DEFAULT_RANGE = 8.0  # SecAggPlusWorkflow's own default clipping_range
