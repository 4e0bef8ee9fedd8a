"""Stage ablation: the defense with each of its elements removed in turn (the study the paper omits)."""
from __future__ import annotations

from dataclasses import replace

from fedmeta import checkpoint, runtime
from fedmeta.defense import MatchingDefense
from fedmeta.evaluation import Learner
from fedmeta.experiment import SCENARIOS, VARIANTS, Lab, flat
from fedmeta.splits import FederatedData

REMOVED = ("none", "attention", "reinit", "finetune", "defense")


def _learner(lab: Lab, removed: str) -> tuple[Learner, int]:
    """The learner and its fine-tuning steps with one element removed."""
    p = lab.p
    full = MatchingDefense(p.defense, lab.finetuner().adam, p.evaluation.n_way)
    steps = p.budget.finetune_steps
    if removed == "attention":
        return replace(full, use_attention=False), steps
    if removed == "reinit":
        return replace(full, reinit=False), steps
    if removed == "finetune":
        return full, 0
    if removed == "defense":
        return lab.finetuner(), steps
    return full, steps


def main() -> None:
    with runtime.stage("ablation") as (params, run):
        lab = Lab(params, FederatedData.load(runtime.PREPARED), runtime.device_of(params))
        user = lab.benign[0]
        thetas = {v: checkpoint.load_theta(runtime.CHECKPOINTS / f"attacked_{v}.pt", lab.device) for v in VARIANTS}
        rows = []
        for removed in runtime.progress(REMOVED, "ablation"):
            learner, steps = _learner(lab, removed)
            meta = {v: flat(lab.meta_test(thetas[v], learner, [steps], "ablation")[0]) for v in VARIANTS}
            for scenario in SCENARIOS.values():
                point = flat(lab.attack_eval(thetas[scenario.variant], learner, scenario, [steps], "ablation", user)[0])
                row = {"removed": removed, "scenario": scenario.name, "steps": steps, **meta[scenario.variant], **point}
                rows.append(row)
                run.metrics({f"{removed}.{scenario.name}.{k}": row[k] for k in ("meta_test", "attack_train", "attack_val")})
        runtime.write_csv(runtime.METRICS / "ablation.csv", rows)
        runtime.write_json(runtime.METRICS / "ablation.json", {f"{r['removed']}.{r['scenario']}": r for r in rows})
