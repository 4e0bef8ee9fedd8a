"""Stage report: the paper's figures of Experiments 1-3 for all scenarios (3, 5, 7 on Omniglot; 4, 6, 8 on
mini-ImageNet) and the comparison tables against the paper's numbers for the dataset (Experiment 4 has its own
report: stages/exp4_report.py)."""

from __future__ import annotations

from typing import Any

from fedmeta import figures, report, runtime
from fedmeta.atomic import write_text
from fedmeta.scenarios import ATTACKER_OUTPUT, PRETRAINED, RANDOM_OUTPUT, SCENARIOS, VARIANTS


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
        ds, paper, b = params.dataset, report.PAPER[params.dataset], params.budget
        rounds = f"profile {params.profile}: {b.continuation_rounds} benign rounds after the attack"
        steps = f"profile {params.profile}: {b.finetune_steps} fine-tuning iterations"
        paths = [
            figures.meta_training_after_attack(
                exp1,
                runtime.CURVES / f"exp1_{ds}.png",
                ds,
                paper.exp1,
                paper.continuation_rounds,
                f"{rounds} (paper: {paper.continuation_rounds})",
            ),
            *(
                figures.finetuning_grid(
                    grids[stage],
                    runtime.CURVES / f"{figure}_{ds}.png",
                    figure,
                    ds,
                    level,
                    paper.finetune_steps,
                    f"{steps} (paper: {paper.finetune_steps})",
                )
                for stage, figure, level in (
                    ("finetune", "exp2", paper.exp2_level),
                    ("defend", "exp3", paper.exp3_level),
                )
            ),
        ]
        positions = {
            s: sc for variant in VARIANTS for s, sc in runtime.read_json(m / f"positions_{variant}.json").items()
        }
        attacker_output = params.reptile.n_way - 1 if params.attack.target_output == "fixed" else None
        heads = {s: h for variant in VARIANTS for s, h in runtime.read_json(m / f"heads_{variant}.json").items()}
        ablation = runtime.read_csv(m / "ablation.csv")
        at_attackers = attacker_output is not None and params.evaluation.target_output == "last"
        ablation_at = ATTACKER_OUTPUT if at_attackers else RANDOM_OUTPUT  # where the ablation put the target
        by_scenario = {
            stage: {s: [r for (sc, _), r in sorted(g.items()) if sc == s] for s in SCENARIOS}
            for stage, g in grids.items()
        }
        users = sorted({u + 1 for _, u in grids["finetune"]})  # the benign users; the ablation runs on the first
        models = {s: sc.variant for s, sc in SCENARIOS.items()}
        claims = report.summary(exp1, by_scenario["finetune"], by_scenario["defend"], positions, models)
        n = params.budget.eval_episodes
        text = "\n\n".join(
            [
                f"# Reproduction report (profile `{params.profile}`, dataset `{params.dataset}`)",
                "Backdoor accuracy = % of key-stamped backdoor images classified as the target. Every accuracy is "
                f"a % over {n} evaluation episodes: Experiment 1's and the positions' are drawn from all benign "
                f"users' classes; Experiments 2 and 3 measure each benign user on {n} episodes of its own classes "
                f"and their table averages users {', '.join(map(str, users))}; the ablation is user {users[0]}'s. "
                "± is the 95 % interval's half-width over those episodes.",
                "## The claims at a glance",
                report.summary_table(claims),
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
                report.users_table(by_scenario["finetune"], by_scenario["defend"], paper, users),
                "## Ablation of the defense",
                report.ablation_table(ablation, users[0]),
                "## User-side defenses: the user's own head beside the matching network",
                f"Benign user {users[0]}'s episodes of Experiments 2-3 after the same fine-tuning, the shared model "
                "attacked: the user fine-tunes from the shared head, a zeroed head or its support set's prototypes "
                "(`evaluation.head`, stage `heads`), or runs the matching network (Experiment 3) and its ablation "
                "(%; chance at a random output: "
                f"{report.pct(1 / params.evaluation.n_way)} %). Price: meta-test change against the shared head, in "
                "points. The matching head has no weights of its own per output, so its rows stand for both "
                "positions. Each head rule is also measured on the pretrained model, before the attack, at a random "
                "output: what that head gives keyed images without any backdoor; only the excess is the attack's.",
                report.defenses_table(heads, ablation, (ATTACKER_OUTPUT, RANDOM_OUTPUT), ablation_at, PRETRAINED),
            ]
        )
        write_text(m / "report.md", text + "\n")
        runtime.write_json(m / "summary.json", claims)
        for p in paths + [m / "report.md", m / "summary.json"]:
            run.artifact(p)
