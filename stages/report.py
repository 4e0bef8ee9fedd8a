"""Stage report: the paper's figures 3, 5, 7 for all scenarios, and the comparison tables."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from fedmeta import figures, report, runtime
from fedmeta.atomic import write_text
from fedmeta.experiment import SCENARIOS


def _read(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _value(key: str, text: str) -> Any:
    if key in ("removed", "scenario"):
        return text
    return int(text) if key in ("round", "step", "steps") else float(text)


def main() -> None:
    with runtime.stage("report") as (params, run):
        m = runtime.METRICS
        exp1 = {s: _read(m / f"exp1_{sc.variant}" / f"{s}.csv") for s, sc in SCENARIOS.items()}
        grids: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = {}
        for stage in ("finetune", "defend"):
            grids[stage] = {}
            for s, sc in SCENARIOS.items():
                for path in sorted((m / f"{stage}_{sc.variant}").glob(f"{s}_user*.csv")):
                    grids[stage][(s, int(path.stem.split("user")[1]) - 1)] = _read(path)
        paths = [
            figures.meta_training_after_attack(exp1, runtime.CURVES / "fig3_exp1.png"),
            figures.finetuning_grid(grids["finetune"], runtime.CURVES / "fig5_exp2.png", "Benign fine-tuning after the attack (Experiment 2)"),
            figures.finetuning_grid(grids["defend"], runtime.CURVES / "fig7_exp3.png", "Matching-network defense (Experiment 3)"),
        ]
        by_scenario = {stage: {s: [r for (sc, _), r in sorted(g.items()) if sc == s] for s in SCENARIOS} for stage, g in grids.items()}
        text = "\n\n".join(
            [
                f"# Reproduction report (profile `{params.profile}`, dataset `{params.dataset}`)",
                "Backdoor accuracy = % of key-stamped backdoor images classified as the target; all numbers are % "
                f"averaged over {params.budget.eval_episodes} episodes.",
                "## Experiment 1: benign meta-training after the attack",
                report.exp1_table(exp1),
                "## Experiments 2 and 3: long benign fine-tuning, without and with the defense",
                report.users_table(by_scenario["finetune"], by_scenario["defend"]),
                "## Ablation of the defense",
                report.ablation_table(_read(m / "ablation.csv")),
            ]
        )
        write_text(m / "report.md", text + "\n")
        for p in paths + [m / "report.md"]:
            run.artifact(p)
