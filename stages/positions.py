"""Stage positions: backdoor accuracy with the target at each output of the user's episodes, and at a random one.

The attacker trains the target as output N − 1; a user's label order is its own. Measuring every position, on
episodes drawn from the attack stage's seeds (`exp1`), shows whether stamped images go to the target class or
merely to an output; the random position is what a user with an arbitrary label order sees. The pretrained model
was never attacked, so no output of it holds a backdoor: it is measured at the random position only, its base rate.
The position the attack stage measured (`evaluation.target_output`) is taken from its metrics, for both models, not
measured a second time."""

from __future__ import annotations

import json

from fedmeta import runtime
from fedmeta.experiment import Experiment, flat
from fedmeta.scenarios import EXP1_TAG, scenarios_of

MODELS = {"pretrained": "pretrain_{}.pt", "attacked": "attacked_{}.pt"}  # before and after the attack round
ATTACK_POINTS = {"pretrained": "before", "attacked": "after"}  # the same models in metrics/attack_<variant>.json
RANDOM = "random"  # the key of the random-position measurement
MEASURED_AT_EVERY_OUTPUT = "attacked"  # the pretrained model's outputs are alike: measured at random only


def position_key(k: int) -> str:
    return f"output_{k}"


def main(variant: str) -> None:
    with runtime.stage("positions", variant=variant) as (params, run):
        exp = Experiment.from_prepared(params)
        learner, steps = exp.finetuner(), params.evaluation.steps
        every: dict[str, int | None] = {position_key(k): k for k in range(params.evaluation.n_way)}
        every[RANDOM] = None
        configured = exp.configured_target()
        measured = RANDOM if configured is None else position_key(configured)
        attack = json.loads((runtime.METRICS / f"attack_{variant}.json").read_text())
        summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for model, name in MODELS.items():
            theta = exp.load_theta(runtime.CHECKPOINTS / name.format(variant))
            positions = every if model == MEASURED_AT_EVERY_OUTPUT else {k: every[k] for k in (measured, RANDOM)}
            for scenario in scenarios_of(variant):
                points = summary.setdefault(scenario.name, {}).setdefault(model, {})
                for key, at in positions.items():
                    if key == measured:  # the same episodes and model as the attack stage's measurement
                        done = attack[scenario.name][ATTACK_POINTS[model]]
                        points[key] = {k: v for k, v in done.items() if not k.startswith(("meta_test", "round"))}
                    else:
                        points[key] = flat(
                            exp.attack_eval(theta, learner, scenario, [steps], EXP1_TAG, target_at=at)[0]
                        )
        runtime.write_json(runtime.METRICS / f"positions_{variant}.json", summary)
        for scenario_name, models in summary.items():
            for model, points in models.items():
                for key, point in points.items():
                    tags = {"experiment": "positions", "scenario": scenario_name, "model": model, "position": key}
                    run.series(tags, [point])
        run.artifact(runtime.METRICS / f"positions_{variant}.json")
