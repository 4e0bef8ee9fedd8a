"""Stage exp4 (Experiment 4): every server rule against the one-shot attack, on one variant and federation.

Its runs, one MLflow run each under the stage's:
- naive: the attacker boosts as in Experiments 1-3, under every rule of experiment4.aggregators;
- adaptive: it knows the norm bound and rescales its update to just under it (attack.norm_bound =
  federation.norm_clip.clip_norm), under norm_clip;
- benign (variant exclude): nobody attacks; each rule's price in meta-test accuracy after the last round;
- secure (federation m4): mean and norm_clip see only masked updates, and each benign user's matching-network
  defense (Experiment 3) is measured on the attacked model, beside plain fine-tuning on the same episodes.

On the local engine all runs aggregate the same round-1 local training, computed once: it depends on neither
the rule nor masking nor how the attacker scales its update, so the rules are compared on identical updates and
the attacker's long training is not repeated per rule. On Flower each run is a federation of its own.

A filtering rule's runs (multi_krum, flame) also record whom it kept and rejected in each round and its detection
rates (`fedmeta.detection`): in DETECTION, in their MLflow runs, and in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmeta import attack, checkpoint, config, detection, runtime, tracking
from fedmeta.atomic import write_text
from fedmeta.config import Config
from fedmeta.defense import MatchingDefense
from fedmeta.experiment import Experiment, LocalWork, flat
from fedmeta.model import Theta
from fedmeta.regroup import regroup
from fedmeta.scenarios import EXP1_TAG, EXP4_USER_TAG
from fedmeta.splits import FederatedData
from stages.common import log_rounds, record_round

SUMMARY = runtime.METRICS / "exp4" / "summary"  # <variant>-<federation>/<run>.json: DVC metrics
CURVES = runtime.METRICS / "exp4" / "curves"  # <variant>-<federation>/<run>/<scenario>.csv: DVC plots
DETECTION = runtime.METRICS / "exp4" / "detection"  # <variant>-<federation>/<run>.json: filtering rules' screenings
ADAPTIVE_RULE = "norm_clip"  # the rule whose bound the adaptive attacker knows
SECURE_RULES = ("mean", "norm_clip")  # the rules that need only the sum of the updates
SECURE_FEDERATION = "m4"  # the paper's federation
BENIGN_VARIANT = "exclude"  # a rule's price needs one pretrained model


@dataclass(frozen=True)
class RuleRun:
    attacker: str  # naive, adaptive or benign (nobody)
    aggregator: str
    secure: bool = False

    @property
    def name(self) -> str:
        return "-".join([self.attacker, self.aggregator, *(["secure"] if self.secure else [])])

    def tags(self) -> dict[str, str]:
        return {
            "aggregator": self.aggregator,
            "attacker": self.attacker,
            "secure_aggregation": str(self.secure).lower(),
        }


def runs(variant: str, federation: str, aggregators: list[str]) -> list[RuleRun]:
    out = [RuleRun("naive", a) for a in aggregators] + [RuleRun("adaptive", ADAPTIVE_RULE)]
    if variant == BENIGN_VARIANT:
        out += [RuleRun("benign", a) for a in aggregators]
    if federation == SECURE_FEDERATION:
        out += [RuleRun("naive", a, secure=True) for a in SECURE_RULES]
    return out


def run_params(base: Config, federation: str, run: RuleRun) -> Config:
    attack = None
    if run.attacker == "adaptive":  # it knows the federation's clipping bound
        attack = {"norm_bound": config.with_overrides(base, federation).federation.norm_clip.clip_norm}
    return config.with_overrides(
        base, federation, attack=attack, aggregator=run.aggregator, secure_aggregation=run.secure
    )


class Round1:
    """The round-1 local work every run of the stage aggregates (local engine), each kind computed on first use
    and kept in the stage's resumable state."""

    def __init__(self, exp: Experiment, theta: Theta, include: bool, resume: checkpoint.Resume, state: dict) -> None:
        self.exp, self.theta, self.include, self.resume, self.state = exp, theta, include, resume, state

    def get(self, with_attacker: bool) -> LocalWork:
        kind = "attacked" if with_attacker else "benign"
        if kind not in self.state["work"]:
            path = self.resume.path.with_name(f"{self.resume.path.stem}-attacker.pt")
            attacker = checkpoint.Resume(path, attacker_every(self.exp.params), self.resume.fingerprint)
            work = self.exp.local_work(self.theta, 1, self.include, with_attacker, attacker)
            self.state["work"][kind] = {"key": work.key, "users": work.users, "local": work.local}
            self.resume.save(len(self.state["outputs"]), self.state, force=True)
            attacker.finish()
        w = self.state["work"][kind]
        return LocalWork(w["key"], list(w["users"]), list(w["local"]))


def main(variant: str, federation: str) -> None:
    with runtime.stage("exp4", variant=variant, federation=federation) as (base, stage_run):
        config.check_experiment4(base, federation, f"exp4 {variant} {federation}")
        fed = config.with_overrides(base, federation).federation
        data = regroup(FederatedData.load(runtime.PREPARED, base), fed.users, fed.attacker)
        pretrained = runtime.CHECKPOINTS / f"pretrain_{variant}.pt"
        plan = runs(variant, federation, list(base.experiment4.aggregators))
        fingerprint = checkpoint.fingerprint(
            base.model_dump_json() + federation + variant, runtime.PREPARED, pretrained
        )
        progress = checkpoint.Resume(runtime.STATE / f"exp4_{variant}-{federation}.pt", 1, fingerprint)
        device = runtime.device_of(base)
        saved = progress.restore(device) or {"work": {}, "outputs": {}}
        state = {"work": saved["work"], "outputs": saved["outputs"]}  # runs done, and the round-1 work they share
        shared: Round1 | None = None
        for run in runtime.progress(plan, f"exp4 {variant} {federation}", total=len(plan)):
            if run.name in state["outputs"]:
                continue
            params = run_params(base, federation, run)
            exp = Experiment(params, data, device)
            theta = exp.load_theta(pretrained)
            if shared is None and params.federation.engine == "local":
                shared = Round1(exp, theta, variant == "include", progress, state)
            try:
                with stage_run.child(runtime.logged(params), run.tags()) as mlflow_run:
                    state["outputs"][run.name] = _run(
                        exp, base, theta, variant, federation, run, mlflow_run, shared, fingerprint
                    )
            finally:
                exp.close()
            progress.save(len(state["outputs"]), state, force=True)
        # DVC's output, there even when no listed rule filters
        (DETECTION / f"{variant}-{federation}").mkdir(parents=True, exist_ok=True)
        for files in state["outputs"].values():
            for rel, text in files.items():
                write_text(Path(rel), text)
        progress.finish()


def _run(
    exp: Experiment,
    base: Config,
    theta: Theta,
    variant: str,
    federation: str,
    run: RuleRun,
    mlflow_run: tracking.Run,
    shared: Round1 | None,
    fingerprint: str,
) -> dict[str, str]:
    """One rule's run from the pretrained θ: the attack round (or a benign one), then experiment4.rounds benign
    rounds; the files it writes, by path."""
    params, b = exp.params, exp.params.budget
    learner, steps, include = exp.finetuner(), params.evaluation.steps, variant == "include"
    last = (base.experiment4.rounds or b.continuation_rounds) + 1  # `params` holds one federation, not experiment4
    attacking = run.attacker != "benign"
    stem = f"{variant}-{federation}/{run.name}"
    rows: dict[str, list[dict[str, float]]] = {}
    if attacking and run.aggregator == "mean" and not run.secure:  # θ_0, the same for every rule: recorded once
        record_round(rows, 0, exp.measure(theta, variant, learner, steps, EXP1_TAG))
    attacked = theta
    for rnd in range(1, last + 1):
        with_attacker = attacking and attack.takes_part(params, rnd)
        if rnd == 1 and shared is not None:
            theta = exp.round(theta, rnd, include, with_attacker, work=shared.get(with_attacker))
        else:
            path = runtime.STATE / f"exp4_{variant}-{federation}-{run.name}.pt"  # the attacker's training, on Flower
            resume = (
                checkpoint.Resume(path, attacker_every(params), f"{fingerprint}-{run.name}-{rnd}")
                if with_attacker
                else None
            )
            theta = exp.round(theta, rnd, include, with_attacker=with_attacker, resume=resume)
            if resume is not None:
                resume.finish()
        attacked = theta if rnd == 1 else attacked
        if attacking:
            record_round(rows, rnd, exp.measure(theta, variant, learner, steps, EXP1_TAG))
    screened = _screened(exp, stem, mlflow_run)
    if not attacking:  # the price of the rule: the final model's meta-test accuracy, nobody attacking
        meta = flat(exp.meta_test(theta, learner, [steps], EXP1_TAG)[0])
        mlflow_run.metrics(tracking.quantities(meta), step=last)
        return screened | {str(SUMMARY / f"{stem}.json"): runtime.json_text({"round": last, **meta})}
    summary = {
        s: {"attack_round": next(r for r in series if r["round"] == 1), "final": series[-1]}
        for s, series in rows.items()
    }
    if run.secure:  # what is left to a user: its own defense against the model the masked round produced
        n = b.finetune_steps
        for label, user_learner in (
            ("finetune", learner),
            ("defense", MatchingDefense.from_params(params, exp.backend)),
        ):
            for scenario, point in exp.measure(attacked, variant, user_learner, n, EXP4_USER_TAG).items():
                summary[scenario][f"user_{label}"] = {"step": n, **point}
                tags = {"experiment": "exp4", "scenario": scenario, "user_choice": label}
                mlflow_run.series(tags, [point])
    log_rounds(mlflow_run, "exp4", rows)
    files = {str(CURVES / stem / f"{s}.csv"): runtime.csv_text(series) for s, series in rows.items()}
    return screened | files | {str(SUMMARY / f"{stem}.json"): runtime.json_text(summary)}


def _screened(exp: Experiment, stem: str, mlflow_run: tracking.Run) -> dict[str, str]:
    """A filtering rule's screening of every round the run saw and its detection rates (`fedmeta.detection`):
    per round in its MLflow run (step = round), and as DETECTION's file; nothing for the rules that keep all."""
    if not exp.screenings:
        return {}
    rows = [detection.round_row(rnd, s, exp.attacker) for rnd, s in sorted(exp.screenings.items())]
    for row in rows:
        mlflow_run.metrics({f"detection_{k}": v for k, v in detection.rates(row).items()}, step=row["round"])
    record = {"attacker": exp.attacker + 1, "rounds": rows, **detection.summary(rows)}  # users numbered from 1
    return {str(DETECTION / f"{stem}.json"): runtime.json_text(record)}


def attacker_every(params: Config) -> int:
    """How often the attacker's training is saved: every checkpoint_every meta-batches of B episodes."""
    return params.budget.checkpoint_every * params.reptile.meta_batch
