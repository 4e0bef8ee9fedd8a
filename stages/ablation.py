"""Stage ablation: the defense with each of its elements removed in turn (the study the paper omits).

All rows use benign user 2's episodes of Experiments 2-3 (the same draws), so the full defense and
no defense at all are Experiment 3's and Experiment 2's final points, read from their metrics
rather than computed again; the three partial defenses run here, and so does a control: the full
defense on the pretrained model that was never attacked ('attack' removed), which measures how
often the defended classifier sends key-stamped images to the target without any backdoor.
"""

from __future__ import annotations

import json
from dataclasses import replace

from fedmeta import runtime
from fedmeta.defense import MatchingDefense
from fedmeta.experiment import Experiment, flat
from fedmeta.scenarios import SCENARIOS, USERS_TAG, VARIANTS

# cosine attention, noisy re-initialisation, fine-tuning, the attack
COMPUTED = ("attention", "reinit", "finetune", "attack")
READ = {"none": "defend", "defense": "finetune"}  # removed nothing / the whole defense: Experiments 3 and 2
# What each row keeps, as MLflow tags it (the files name what is removed): "none" removed is the full defense.
KEPT = {
    "none": "full",
    "attention": "no_attention",
    "reinit": "no_reinit",
    "finetune": "no_finetune",
    "attack": "full_never_attacked",
    "defense": "no_defense",
}


def main() -> None:
    with runtime.stage("ablation") as (params, run):
        exp = Experiment.from_prepared(params)
        user, steps = exp.benign[0], params.budget.finetune_steps
        full = MatchingDefense.from_params(params, exp.backend)
        learners = {
            "attention": (replace(full, use_attention=False), steps),
            "reinit": (replace(full, reinit=False), steps),
            "finetune": (full, 0),
            "attack": (full, steps),
        }
        models = {
            (v, m): exp.load_theta(runtime.CHECKPOINTS / f"{m}_{v}.pt")
            for v in VARIANTS
            for m in ("attacked", "pretrain")
        }
        by_removed: dict[str, list[dict]] = {removed: [] for removed in ("none", *COMPUTED, "defense")}
        for removed, stage in READ.items():
            for scenario in SCENARIOS.values():
                final = json.loads((runtime.METRICS / f"{stage}_{scenario.variant}.json").read_text())[
                    f"{scenario.name}_user{user + 1}"
                ]
                by_removed[removed].append(
                    {
                        "removed": removed,
                        "scenario": scenario.name,
                        "steps": final["step"],
                        **{k: v for k, v in final.items() if k != "step"},
                    }
                )
        for removed in runtime.progress(COMPUTED, "ablation"):
            learner, n = learners[removed]
            thetas = {v: models[(v, "pretrain" if removed == "attack" else "attacked")] for v in VARIANTS}
            meta = {v: flat(exp.meta_test(thetas[v], learner, [n], USERS_TAG)[0]) for v in VARIANTS}
            for scenario in SCENARIOS.values():
                point = flat(exp.attack_eval(thetas[scenario.variant], learner, scenario, [n], USERS_TAG, user)[0])
                by_removed[removed].append(
                    {"removed": removed, "scenario": scenario.name, "steps": n, **meta[scenario.variant], **point}
                )
        rows = [r for part in by_removed.values() for r in part]
        runtime.write_csv(runtime.METRICS / "ablation.csv", rows)
        runtime.write_json(runtime.METRICS / "ablation.json", {f"{r['removed']}.{r['scenario']}": r for r in rows})
        for r in rows:
            tags = {"experiment": "ablation", "ablation": KEPT[r["removed"]], "scenario": r["scenario"]}
            run.series({**tags, "user": str(user + 1)}, [r])
        for path in (runtime.METRICS / "ablation.csv", runtime.METRICS / "ablation.json"):
            run.artifact(path)
