"""Stage exp4 (Experiment 4): one server rule against the one-shot attack, then benign rounds.

Attacker `naive` boosts as in Experiments 1-3, `adaptive` knows the norm bound and rescales its update
to just under it (attack.norm_bound = federation.norm_clip.clip_norm), `benign` is nobody: the rule's
price in meta-test accuracy, measured once, after the last round. With `secure`, the server sees only
masked updates, and each benign user's matching-network defense (Experiment 3) is measured on the
attacked model, beside plain fine-tuning on the same episodes.
"""

from __future__ import annotations

from fedmeta import checkpoint, config, robust, runtime
from fedmeta.defense import MatchingDefense
from fedmeta.experiment import Experiment, flat
from fedmeta.splits import FederatedData
from stages.common import record_round

ATTACKERS = ("naive", "adaptive", "benign")


def run_name(aggregator: str, variant: str, federation: str, attacker: str, secure: bool) -> str:
    return "-".join([attacker, aggregator, *(["secure"] if secure else []), variant, federation])


def main(aggregator: str, variant: str, federation: str, attacker: str, secure: bool) -> None:
    name = run_name(aggregator, variant, federation, attacker, secure)
    tags = {
        "variant": variant,
        "aggregator": aggregator,
        "federation": federation,
        "attacker": attacker,
        "secure_aggregation": str(secure).lower(),
    }
    with runtime.stage("exp4", **tags) as (base, run):
        params = config.with_overrides(base, federation, aggregator=aggregator, secure_aggregation=secure)
        if attacker == "adaptive":
            bound = {"norm_bound": params.federation.norm_clip.clip_norm}
            params = config.with_overrides(
                base, federation, attack=bound, aggregator=aggregator, secure_aggregation=secure
            )
        fed, b = params.federation, params.budget
        data = robust.regroup(FederatedData.load(runtime.PREPARED, base), fed.users, fed.attacker)
        exp = Experiment(params, data, runtime.device_of(params))
        pretrained = runtime.CHECKPOINTS / f"pretrain_{variant}.pt"
        theta = checkpoint.load_theta(pretrained, exp.device, exp.theta_spec())
        fingerprint = checkpoint.fingerprint(params.model_dump_json(), runtime.PREPARED, pretrained)
        resume = checkpoint.Resume(
            runtime.STATE / f"exp4_{name}.pt", b.checkpoint_every * params.reptile.meta_batch, fingerprint
        )
        learner, steps, include = exp.finetuner(), params.evaluation.steps, variant == "include"
        last = (base.experiment4.rounds or b.continuation_rounds) + 1  # `params` holds one federation, not experiment4
        rows: dict[str, list[dict[str, float]]] = {}
        if attacker != "benign" and aggregator == "mean" and not secure:  # θ_0, the same for every rule: recorded once
            record_round(run, rows, 0, exp.measure(theta, variant, learner, steps, robust.EXP1_TAG))
        attacked = theta
        for rnd in runtime.progress(range(1, last + 1), f"exp4 {name}", total=last):
            theta = exp.round(
                theta,
                rnd,
                include,
                with_attacker=rnd == 1 and attacker != "benign",
                resume=resume if rnd == 1 else None,
            )
            attacked = theta if rnd == 1 else attacked
            if attacker != "benign":
                record_round(run, rows, rnd, exp.measure(theta, variant, learner, steps, robust.EXP1_TAG))
        if attacker == "benign":  # the price of the rule: the final model's meta-test accuracy, nobody attacking
            meta = flat(exp.meta_test(theta, learner, [steps], robust.EXP1_TAG)[0])
            run.metrics(meta, step=last)
            runtime.write_json(runtime.METRICS / "exp4" / f"{name}.json", {"round": last, **meta})
            resume.finish()
            return
        summary = {
            s: {"attack_round": next(r for r in series if r["round"] == 1), "final": series[-1]}
            for s, series in rows.items()
        }
        if secure:  # what is left to a user: its own defense against the model the masked round produced
            n = b.finetune_steps
            for label, user_learner in (("finetune", learner), ("defense", MatchingDefense.from_params(params))):
                for scenario, point in exp.measure(attacked, variant, user_learner, n, robust.USER_TAG).items():
                    summary[scenario][f"user_{label}"] = {"step": n, **point}
                    run.metrics({f"{scenario}.user_{label}.{k}": v for k, v in point.items()})
        for scenario, series in rows.items():
            runtime.write_csv(runtime.METRICS / "exp4" / name / f"{scenario}.csv", series)
        runtime.write_json(runtime.METRICS / "exp4" / f"{name}.json", summary)
        resume.finish()
