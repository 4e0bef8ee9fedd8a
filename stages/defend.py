"""Stage defend (Experiment 3): each benign user fine-tunes a matching network over a noisy re-initialisation."""

from __future__ import annotations

from fedmeta.defense import MatchingDefense
from stages.common import user_curves_stage


def main(variant: str) -> None:
    user_curves_stage("defend", variant, lambda exp: MatchingDefense.from_params(exp.params, exp.backend))
