"""What several stages share: recording a round's measurements (Experiments 1 and 4), and the loop
Experiments 2 and 3 share, where only the learner differs."""

from __future__ import annotations

from collections.abc import Callable

from fedmeta import checkpoint, runtime, tracking
from fedmeta.evaluation import Learner
from fedmeta.experiment import Experiment, user_curves
from fedmeta.splits import FederatedData


def user_curves_stage(stage: str, variant: str, make_learner: Callable[[Experiment], Learner]) -> None:
    with runtime.stage(stage, variant=variant) as (params, run):
        exp = Experiment(params, FederatedData.load(runtime.PREPARED, params), runtime.device_of(params))
        theta = checkpoint.load_theta(runtime.CHECKPOINTS / f"attacked_{variant}.pt", exp.device, exp.theta_spec())
        curves = user_curves(exp, theta, make_learner(exp), variant)
        out = runtime.METRICS / f"{stage}_{variant}"
        final = {}
        for (scenario, user), rows in curves.items():
            runtime.write_csv(out / f"{scenario}_user{user + 1}.csv", rows)
            final[f"{scenario}_user{user + 1}"] = rows[-1]
            for row in rows:
                run.metrics(
                    {f"{scenario}.user{user + 1}.{k}": v for k, v in row.items() if k != "step"}, step=row["step"]
                )
        runtime.write_json(runtime.METRICS / f"{stage}_{variant}.json", final)


def record_round(
    run: tracking.Run, rows: dict[str, list[dict[str, float]]], rnd: int, points: dict[str, dict[str, float]]
) -> None:
    """Append round `rnd`'s point to each scenario's series and log it, one MLflow curve per scenario and metric."""
    for scenario, point in points.items():
        rows.setdefault(scenario, []).append({"round": rnd, **point})
        run.metrics({f"{scenario}.{k}": v for k, v in point.items()}, step=rnd)
