"""Stage report: the paper's figures of Experiments 1-3 for all scenarios (3, 5, 7 on Omniglot; 4, 6, 8 on
mini-ImageNet) and the comparison tables against the paper's numbers for the dataset (Experiment 4 has its own
report: stages/exp4_report.py)."""

from __future__ import annotations

import json
from typing import Any

from fedmeta import figures, report, runtime
from fedmeta.atomic import write_text
from fedmeta.experiment import ATTACKER_OUTPUT, RANDOM_OUTPUT, SCENARIOS, VARIANTS


def main() -> None:
    with runtime.stage("report") as (params, run):
        m = runtime.METRICS
        exp1 = {s: runtime.read_csv(m / f"exp1_{sc.variant}" / f"{s}.csv") for s, sc in SCENARIOS.items()}
        grids: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = {}
        for stage in ("finetune", "defend"):
            grids[stage] = {}
            for s, sc in SCENARIOS.items():
                for path in sorted((m / f"{stage}_{sc.variant}").glob(f"{s}_user*.csv")):
                    grids[stage][(s, int(path.stem.split("user")[1]) - 1)] = runtime.read_csv(path)
        ds, paper = params.dataset, report.PAPER[params.dataset]
        paths = [
            figures.meta_training_after_attack(exp1, runtime.CURVES / f"exp1_{ds}.png", ds),
            figures.finetuning_grid(grids["finetune"], runtime.CURVES / f"exp2_{ds}.png", "exp2", ds),
            figures.finetuning_grid(grids["defend"], runtime.CURVES / f"exp3_{ds}.png", "exp3", ds),
        ]
        positions = {
            s: sc for variant in VARIANTS for s, sc in json.loads((m / f"positions_{variant}.json").read_text()).items()
        }
        attacker_output = params.reptile.n_way - 1 if params.attack.target_output == "fixed" else None
        heads = {s: h for variant in VARIANTS for s, h in json.loads((m / f"heads_{variant}.json").read_text()).items()}
        ablation = runtime.read_csv(m / "ablation.csv")
        at_attackers = attacker_output is not None and params.evaluation.target_output == "last"
        ablation_at = ATTACKER_OUTPUT if at_attackers else RANDOM_OUTPUT  # where the ablation put the target
        by_scenario = {
            stage: {s: [r for (sc, _), r in sorted(g.items()) if sc == s] for s in SCENARIOS}
            for stage, g in grids.items()
        }
        text = "\n\n".join(
            [
                f"# Reproduction report (profile `{params.profile}`, dataset `{params.dataset}`)",
                "Backdoor accuracy = % of key-stamped backdoor images classified as the target; all numbers are % "
                f"averaged over {params.budget.eval_episodes} episodes.",
                "## Experiment 1: benign meta-training after the attack",
                report.exp1_table(exp1, paper),
                "## Where the target sits in the user's episodes",
                "Accuracy after the attack stage's fine-tuning, on episodes drawn from its seeds, with the target "
                "at each output in turn and at a random output (% ± the 95 % interval's half-width). "
                + (
                    f"The attacker trains the target as output {attacker_output}, and the paper's numbers are "
                    "measured there; "
                    if attacker_output is not None
                    else "This attacker puts the target at a random output of its episodes; "
                )
                + "a user's label order is its own, so the random output is the headline (chance: "
                f"{report.pct(1 / params.evaluation.n_way)} %).",
                report.positions_table(positions, paper, params.evaluation.n_way, attacker_output),
                "## Experiments 2 and 3: long benign fine-tuning, without and with the defense",
                report.users_table(by_scenario["finetune"], by_scenario["defend"], paper),
                "## Ablation of the defense",
                report.ablation_table(ablation),
                "## User-side defenses: the user's own head beside the matching network",
                "Benign user 2's episodes of Experiments 2-3 after the same fine-tuning, the shared model attacked: "
                "the user fine-tunes from the shared head, a zeroed head or its support set's prototypes "
                "(`evaluation.head`, stage `heads`), or runs the matching network (Experiment 3) and its ablation "
                "(%; chance at a random output: "
                f"{report.pct(1 / params.evaluation.n_way)} %). Price: meta-test change against the shared head, in "
                "points. The matching head has no weights of its own per output, so its rows stand for both "
                "positions.",
                report.defenses_table(heads, ablation, (ATTACKER_OUTPUT, RANDOM_OUTPUT), ablation_at),
            ]
        )
        write_text(m / "report.md", text + "\n")
        for p in paths + [m / "report.md"]:
            run.artifact(p)
