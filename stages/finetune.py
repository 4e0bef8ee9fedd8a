"""Stage finetune (Experiment 2): each benign user fine-tunes the attacked model for a long time."""

from __future__ import annotations

from stages.common import user_curves_stage


def main(variant: str) -> None:
    user_curves_stage("finetune", variant, lambda exp: exp.finetuner())
