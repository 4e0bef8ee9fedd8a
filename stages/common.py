"""What several stages share: recording a round's measurements (Experiments 1 and 4), and the loop
Experiments 2 and 3 share, where only the learner differs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedmeta import runtime, tracking
from fedmeta.evaluation import Learner
from fedmeta.experiment import Experiment, user_curves

EXPERIMENTS = {"finetune": "exp2", "defend": "exp3"}  # the paper's experiment each stage runs, as MLflow tags it


def user_curves_stage(stage: str, variant: str, make_learner: Callable[[Experiment], Learner]) -> None:
    with runtime.stage(stage, variant=variant) as (params, run):
        exp = Experiment.from_prepared(params)
        theta = exp.load_theta(runtime.CHECKPOINTS / f"attacked_{variant}.pt")
        curves = user_curves(exp, theta, make_learner(exp), variant)
        out = runtime.METRICS / f"{stage}_{variant}"
        final = {}
        for (scenario, user), rows in curves.items():
            runtime.write_csv(out / f"{scenario}_user{user + 1}.csv", rows)
            final[f"{scenario}_user{user + 1}"] = rows[-1]
        runtime.write_json(runtime.METRICS / f"{stage}_{variant}.json", final)
        for (scenario, user), rows in curves.items():
            tags = {"experiment": EXPERIMENTS[stage], "scenario": scenario, "user": str(user + 1)}
            run.series(tags, rows, "step", (out / f"{scenario}_user{user + 1}.csv",))
        run.artifact(runtime.METRICS / f"{stage}_{variant}.json")


def record_round(rows: dict[str, list[dict[str, float]]], rnd: int, points: dict[str, dict[str, float]]) -> None:
    """Append round `rnd`'s point to each scenario's series (logged once complete: `log_rounds`)."""
    for scenario, point in points.items():
        rows.setdefault(scenario, []).append({"round": rnd, **point})


def log_rounds(
    run: tracking.Run, experiment: str, rows: dict[str, list[dict[str, float]]], files: dict[str, Path] | None = None
) -> None:
    """Each scenario's series against rounds as a nested MLflow run tagged with `experiment` and the scenario, with
    its CSV (`files`, by scenario) attached."""
    for scenario, series in rows.items():
        extra = (files[scenario],) if files else ()
        run.series({"experiment": experiment, "scenario": scenario}, series, "round", extra)
