"""Stage defend (Experiment 3): each benign user fine-tunes a matching network over a noisy re-initialisation."""
from __future__ import annotations

from fedmeta.config import Params
from fedmeta.defense import MatchingDefense
from fedmeta.experiment import Lab
from stages.common import user_curves_stage


def _defense(lab: Lab, params: Params) -> MatchingDefense:
    return MatchingDefense(params.defense, lab.finetuner().adam, params.evaluation.n_way)


def main(variant: str) -> None:
    user_curves_stage("defend", variant, _defense)
