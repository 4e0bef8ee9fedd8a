"""The loop Experiments 2 and 3 share: only the learner differs."""
from __future__ import annotations

from collections.abc import Callable

from fedmeta import checkpoint, runtime
from fedmeta.evaluation import Learner
from fedmeta.experiment import Lab, user_curves
from fedmeta.splits import FederatedData


def user_curves_stage(stage: str, variant: str, make_learner: Callable[[Lab], Learner]) -> None:
    with runtime.stage(stage, variant=variant) as (params, run):
        lab = Lab(params, FederatedData.load(runtime.PREPARED, params), runtime.device_of(params))
        theta = checkpoint.load_theta(runtime.CHECKPOINTS / f"attacked_{variant}.pt", lab.device, lab.theta_spec())
        curves = user_curves(lab, theta, make_learner(lab), variant)
        out = runtime.METRICS / f"{stage}_{variant}"
        final = {}
        for (scenario, user), rows in curves.items():
            runtime.write_csv(out / f"{scenario}_user{user + 1}.csv", rows)
            final[f"{scenario}_user{user + 1}"] = rows[-1]
            for row in rows:
                run.metrics({f"{scenario}.user{user + 1}.{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        runtime.write_json(runtime.METRICS / f"{stage}_{variant}.json", final)
