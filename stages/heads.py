"""Stage heads: the user's own classifier head (`evaluation.head`) as a defense against the attacked model.

The one-shot backdoor is stored in the classifier row where the attacker trains its target, so a user that drops the
shared head before fine-tuning (zeroed, or set from its support set's prototypes: `fedmeta.head`) may lose it. Every
head rule fine-tunes on the episodes the ablation of the matching-network defense uses (benign user 2's episodes of
Experiments 2-3, the profile's finetune_steps), so its rows stand beside the ablation's, paired. Backdoor accuracy is
measured with the target at the attacker's output, where the backdoor is stored (when the attacker trains one), and
at a random output, what a user with a label order of its own sees. `shared` at the attacker's output is Experiment
2's final point for that user, measured again on the same episodes so that all head rules come from one stage.

Each rule is also measured on the pretrained model, before any attack (`pretrained`: target at a random output, the
same episodes): a fresh head maps keyed images to the target for reasons of its own, and only the excess over that
base rate is the backdoor's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

from fedmeta import runtime
from fedmeta.config import Config, Head
from fedmeta.experiment import Experiment, flat
from fedmeta.model import Theta
from fedmeta.scenarios import ATTACKER_OUTPUT, PRETRAINED, RANDOM_OUTPUT, USERS_TAG, scenarios_of


def measurements(params: Config, attacked: Theta, clean: Theta) -> list[tuple[str, Theta, int | None]]:
    """Each measurement's name, model and target output: the attacked model at the attacker's output (N − 1, when
    attack.target_output is fixed) and at a random one per episode (None), and the pretrained model at a random one."""
    fixed = [(ATTACKER_OUTPUT, attacked, params.reptile.n_way - 1)] if params.attack.target_output == "fixed" else []
    return [*fixed, (RANDOM_OUTPUT, attacked, None), (PRETRAINED, clean, None)]


def main(variant: str) -> None:
    with runtime.stage("heads", variant=variant) as (params, run):
        exp = Experiment.from_prepared(params)
        theta = exp.load_theta(runtime.CHECKPOINTS / f"attacked_{variant}.pt")
        clean = exp.load_theta(runtime.CHECKPOINTS / f"pretrain_{variant}.pt")
        user, steps = exp.benign[0], params.budget.finetune_steps
        result: dict[str, dict[str, dict]] = {}
        for rule in runtime.progress(get_args(Head), "heads"):
            learner = replace(exp.finetuner(), head=rule)
            meta = flat(exp.meta_test(theta, learner, [steps], USERS_TAG)[0])
            for scenario in scenarios_of(variant):
                row: dict = {"steps": steps, **meta}
                for key, model, at in measurements(params, theta, clean):
                    point = exp.attack_eval(model, learner, scenario, [steps], USERS_TAG, user, target_at=at)[0]
                    row[key] = flat(point)
                    run.metrics({f"{scenario.name}.{rule}.{key}.{k}": v for k, v in row[key].items()})
                run.metrics({f"{scenario.name}.{rule}.{k}": v for k, v in meta.items()})
                result.setdefault(scenario.name, {})[rule] = row
        runtime.write_json(runtime.METRICS / f"heads_{variant}.json", result)
