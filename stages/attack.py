"""Stage attack: the one-shot boosted backdoor attack in round 1 (paper Sec. 2-3)."""

from __future__ import annotations

import time

from fedmeta import checkpoint, runtime
from fedmeta.experiment import Experiment
from fedmeta.scenarios import EXP1_TAG
from stages.common import log_rounds, record_round


def main(variant: str) -> None:
    with runtime.stage("attack", variant=variant) as (params, run):
        exp = Experiment.from_prepared(params)
        pretrained = runtime.CHECKPOINTS / f"pretrain_{variant}.pt"
        theta0 = exp.load_theta(pretrained)
        # The attacker's training is the long part: saved every checkpoint_every meta-batches (of B episodes),
        # and at most 100 times, since a deep attacker's saves would otherwise cost more than what they protect.
        every = params.budget.checkpoint_every * params.reptile.meta_batch
        every *= max(1, params.budget.attack_episodes // (100 * every))
        fingerprint = checkpoint.fingerprint(params.model_dump_json(), runtime.PREPARED, pretrained)
        episodes = params.budget.attack_episodes
        with runtime.progress_bar(f"attacker {variant} (episodes)", episodes) as update:
            resume = checkpoint.Resume(runtime.STATE / f"attack_{variant}.pt", every, fingerprint, update)
            started = time.perf_counter()
            theta1 = exp.round(theta0, 1, variant == "include", with_attacker=True, resume=resume)
            seconds = time.perf_counter() - started
        # What one attacker episode costs here (docs/depth.md); a resumed run counts only the part it ran.
        run.metrics({"attack_round_seconds": round(seconds, 1)})
        checkpoint.save(runtime.CHECKPOINTS / f"attacked_{variant}.pt", {"theta": theta1, "round": 1})
        learner, rows = exp.finetuner(), {}
        for rnd, theta in ((0, theta0), (1, theta1)):
            record_round(rows, rnd, exp.measure(theta, variant, learner, params.evaluation.steps, EXP1_TAG))
        summary = {s: {"before": r[0], "after": r[1]} for s, r in rows.items()}
        runtime.write_json(runtime.METRICS / f"attack_{variant}.json", summary)
        log_rounds(run, "attack", rows)
        for path in (runtime.METRICS / f"attack_{variant}.json", runtime.CHECKPOINTS / f"attacked_{variant}.pt"):
            run.artifact(path)
        resume.finish()
