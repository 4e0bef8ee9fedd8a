"""`fedmeta meta-test`: one checkpoint's meta-test accuracy over as many episodes as asked for.

The pipeline reports 40-episode means, as the paper does: with one query per class their 95 %
interval is ±2–5 points, wider than some differences worth knowing (the defense's cost, say).
The first 40 episodes (tasks and inner batches) are the pipeline's own meta-test episodes of
Experiments 2-3, the rest are drawn after them, so the estimate tightens around the same quantity
(the defense's Glorot draws differ); the learners are the pipeline's, from params.yaml.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmeta import runtime
from fedmeta.atomic import write_text
from fedmeta.config import MAX_EVAL_EPISODES, load
from fedmeta.defense import MatchingDefense
from fedmeta.errors import FedmetaError
from fedmeta.evaluation import Learner
from fedmeta.experiment import Experiment, flat, record_points
from fedmeta.scenarios import USERS_TAG

# Experiment 2's and Experiment 3's learners, as the pipeline builds them, by name
LEARNERS: dict[str, Callable[[Experiment], Learner]] = {
    "finetune": lambda exp: exp.finetuner(),
    "defense": lambda exp: MatchingDefense.from_params(exp.params, exp.backend),
}


def main(
    ckpt: Path, learner: str, episodes: int, out: Path | None, params_path: Path = Path("params.yaml")
) -> dict[str, Any]:
    if episodes > MAX_EVAL_EPISODES:  # all are fine-tuned at once
        raise FedmetaError(
            f"--episodes: {episodes} exceeds the {MAX_EVAL_EPISODES} episodes fine-tuned at once; "
            f"allowed: 1 to {MAX_EVAL_EPISODES}"
        )
    params = load(params_path)
    runtime.configure(params)
    exp = Experiment.from_prepared(params)
    theta = exp.load_theta(ckpt)
    chosen = LEARNERS[learner](exp)
    steps = record_points(params.budget.finetune_steps, params.budget.record_every)
    points = exp.meta_test(theta, chosen, steps, USERS_TAG, episodes)
    result = {
        "checkpoint": str(ckpt),
        "learner": learner,
        "episodes": episodes,
        "curve": [{"step": s, **flat(p)} for s, p in zip(steps, points)],
    }
    for row in result["curve"]:
        print(f"step {row['step']:>4}: meta-test {100 * row['meta_test']:.2f} % ± {100 * row['meta_test_ci95']:.2f}")
    if out is not None:
        write_text(out, json.dumps(result, indent=2) + "\n")
    return result
