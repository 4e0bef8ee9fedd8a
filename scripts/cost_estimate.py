"""Estimate each stage's wall time for one profile from a `fedmeta bench` result, before committing days to it.

    python scripts/cost_estimate.py PROFILE BENCH_JSON [--params params.yaml] [--set KEY=VALUE ...] [--stages S,..]

--set overrides a dotted key as `dvc exp run -S` does, so a run of `scripts/depth.sh` is predicted before it
starts, e.g. --set profiles.long.attack_episodes=50000 (docs/depth.md).

A stage's cost is its Conv4 training steps (batch 10) at the bench's meta-training rate, plus its
measurements in units of the bench's evaluation episode (50 fine-tuning steps and one prediction); a
measurement of n fine-tuning steps counts n / 50 of them, the defense 1.9 times that (its CPU cost
against plain fine-tuning in docs/performance.md). Run the bench at the profile's image shape
(`fedmeta bench --dataset miniimagenet` for mini-ImageNet). Process start-up, data loading and
predictions at every recorded point are left out, so the figures are lower bounds of the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from fedmeta import config
from fedmeta.errors import FedmetaError

DEFENSE_FACTOR = 1.9


def stage_work(p: config.Config) -> dict[str, tuple[int, float]]:
    """Per stage: (training steps, measurements in bench evaluation episodes)."""
    b, r, fed, spec = p.budget, p.reptile, p.federation, p.spec
    local = b.episodes_per_round * r.inner_steps  # one benign user's steps in one round
    attacker = b.attack_episodes * -(-b.attack_inner_epochs * r.n_way * spec.train_shots // r.inner_batch)
    measure = b.eval_episodes  # one meta-test or attack evaluation at evaluation.steps
    tuned = b.eval_episodes * b.finetune_steps / p.evaluation.steps  # one over Experiments 2-3's fine-tuning
    work: dict[str, tuple[int, float]] = {}
    for variant, scenarios in (("exclude", 1), ("include", 2)):
        points = 1 + scenarios  # meta-test, then each scenario's attack evaluation
        round_steps = fed.per_round * local
        evaluated = math.ceil(b.pretrain_rounds / b.pretrain_eval_every)
        work[f"pretrain@{variant}"] = (b.pretrain_rounds * round_steps, evaluated * measure)
        work[f"attack@{variant}"] = (attacker + (fed.min_updates - 1) * local, 2 * points * measure)
        measured = math.ceil(b.continuation_rounds / b.continuation_eval_every)
        work[f"continue@{variant}"] = (b.continuation_rounds * round_steps, measured * points * measure)
        users = fed.users - 1
        work[f"finetune@{variant}"] = (0, (1 + users * scenarios) * tuned)
        work[f"defend@{variant}"] = (0, (1 + users * scenarios) * tuned * DEFENSE_FACTOR)
    work["ablation"] = (0, 3 * (2 + 3) * tuned * DEFENSE_FACTOR)  # 3 computed variants: 2 meta-tests, 3 scenarios
    x4 = p.experiment4
    rounds = x4.rounds or b.continuation_rounds
    steps, evals = 0, 0.0
    for name in x4.federations:
        per_round = config.with_overrides(p, name).federation.per_round
        for scenarios in (1, 2):
            # naive under each rule, adaptive; on m4 also secure aggregation under mean and norm_clip; all on one
            # round-1 local training (stages/exp4.py), then each its own benign rounds
            runs = len(x4.aggregators) + 1 + (2 if name == "m4" else 0)
            steps += attacker + (per_round - 1) * local + runs * rounds * per_round * local
            evals += runs * (rounds + 1) * (1 + scenarios) * measure
            if name == "m4":
                evals += 2 * (1 + scenarios) * tuned * (1 + DEFENSE_FACTOR)
        steps += (1 + len(x4.aggregators) * rounds) * per_round * local  # the benign runs, round 1 shared
        evals += len(x4.aggregators) * measure
    work["exp4"] = (steps, evals)
    return work


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("bench", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted key's value")
    parser.add_argument("--stages", help="comma-separated stage names (e.g. attack,continue); default: all")
    args = parser.parse_args()
    try:
        raw = config.load(args.params).model_dump(mode="json")
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise FedmetaError(f"--set {item}: expected KEY=VALUE, e.g. profiles.long.attack_episodes=50000")
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        dataset = "miniimagenet" if args.profile == "paper-miniimagenet" else raw["dataset"]
        p = config.parse(raw | {"profile": args.profile, "dataset": dataset})
        bench = json.loads(args.bench.read_text())
        train, evaluation = 10 * bench["meta_train"]["fedmeta_eps_per_s"], bench["evaluation"]["fedmeta_eps_per_s"]
    except (FedmetaError, OSError, KeyError, json.JSONDecodeError) as err:
        sys.exit(f"error: {err}")
    rates = f"{train:.1f} training steps/s and {evaluation:.2f} evaluation episodes/s"
    print(f"{args.profile} ({p.dataset}) at {rates} ({bench['device']})")
    total = 0.0
    wanted = args.stages.split(",") if args.stages else None
    for stage, (steps, evals) in stage_work(p).items():
        if wanted is not None and stage.split("@")[0] not in wanted:
            continue
        seconds = steps / train + evals / evaluation
        total += seconds
        print(f"{stage:<18}{steps / 1e6:>9.2f} M steps{evals:>10.0f} evaluation episodes{hours(seconds):>10}")
    print(f"{'all':<18}{hours(total):>56}")


if __name__ == "__main__":
    main()
