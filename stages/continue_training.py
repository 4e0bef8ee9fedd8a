"""Stage continue (Experiment 1): federated meta-training goes on after the attack, benign but for the rounds a
repeated attacker comes back in (`attack.takes_part`)."""

from __future__ import annotations

import json

from fedmeta import attack, checkpoint, runtime
from fedmeta.experiment import Experiment
from fedmeta.scenarios import EXP1_TAG
from stages.common import log_rounds, record_round


def main(variant: str) -> None:
    with runtime.stage("continue", variant=variant) as (params, run):
        exp = Experiment.from_prepared(params.continuation())
        b, include = params.budget, variant == "include"
        attacked = runtime.CHECKPOINTS / f"attacked_{variant}.pt"
        theta = exp.load_theta(attacked)
        attack_rows = json.loads((runtime.METRICS / f"attack_{variant}.json").read_text())
        fingerprint = checkpoint.fingerprint(params.model_dump_json(), runtime.PREPARED, attacked)
        resume = checkpoint.Resume(runtime.STATE / f"continue_{variant}.pt", b.checkpoint_every, fingerprint)
        saved = resume.restore(exp.device)
        if saved is None:
            rows = {s: [r["before"], r["after"]] for s, r in attack_rows.items()}
            start = 2
        else:
            theta, rows, start = saved["theta"], saved["rows"], saved["done"] + 1
        learner, last = exp.finetuner(), b.continuation_rounds + 1
        trains = runtime.STATE / f"continue_{variant}-attacker.pt"
        every = b.checkpoint_every * params.reptile.meta_batch
        for rnd in runtime.progress(range(start, last + 1), f"continue {variant}", start=start - 2, total=last - 1):
            comes = attack.takes_part(params, rnd)  # a returning attacker's training resumes within its round
            within = checkpoint.Resume(trains, every, f"{fingerprint}-{rnd}") if comes else None
            theta = exp.round(theta, rnd, include, comes, within)
            if within is not None:
                within.finish()  # once the stage's outputs are in place (atomic.remove)
            if (rnd - 1) % b.continuation_eval_every == 0 or rnd == last:
                record_round(rows, rnd, exp.measure(theta, variant, learner, params.evaluation.steps, EXP1_TAG))
            resume.save(rnd, {"theta": theta, "rows": rows}, force=rnd == last)
        out = runtime.METRICS / f"exp1_{variant}"
        for name, series in rows.items():
            runtime.write_csv(out / f"{name}.csv", series)
        runtime.write_json(runtime.METRICS / f"exp1_{variant}.json", {s: r[-1] for s, r in rows.items()})
        # Experiment 1's whole curve per scenario, the attack's rounds 0 and 1 included: the paper's Fig. 3
        log_rounds(run, "exp1", rows, {name: out / f"{name}.csv" for name in rows})
        run.artifact(runtime.METRICS / f"exp1_{variant}.json")
        resume.finish()
