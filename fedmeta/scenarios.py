"""The paper's names for what is compared, without torch: which pretrained models exist, which scenarios
start from them, and the tags that decide which episodes a measurement draws.

Reporting code (stages/report.py, fedmeta/seeds.py) reads these alone, so a change to the training code
never reruns a report.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("exclude", "include")  # benign pretraining without / with correctly-labelled backdoor classes


@dataclass(frozen=True)
class Scenario:
    name: str
    variant: str  # which pretrained (and attacked) model the scenario starts from
    backdoor_in_finetuning: bool  # (c): backdoor classes, correctly labelled, in the evaluation's episodes


SCENARIOS = {
    "a": Scenario("a", "exclude", False),
    "b": Scenario("b", "include", False),
    "c": Scenario("c", "include", True),
}


def scenarios_of(variant: str) -> list[Scenario]:
    return [s for s in SCENARIOS.values() if s.variant == variant]


# A measurement with the target at the attacker's output and at a random one: its keys (stage heads, the report).
ATTACKER_OUTPUT, RANDOM_OUTPUT = "attacker_output", "random_output"
PRETRAINED = "pretrained"  # the same measurement on the model before the attack, a random output: its base rate

# The episode-draw tags: measurements with the same tag draw the same episodes, so they compare paired.
EXP1_TAG = "exp1"  # Experiment 1 and positions; Experiment 4's mean rule on M = 4 repeats Experiment 1 exactly
USERS_TAG = "users"  # Experiments 2, 3, the ablation and meta-test curves: one set of episodes per user
EXP4_USER_TAG = "exp4-user"  # Experiment 4's user-side comparison: the same episodes with and without the defense
