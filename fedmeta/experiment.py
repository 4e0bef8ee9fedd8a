"""The paper's federation, attack and measurements over one prepared dataset.

Stages are thin wrappers over `Experiment`: it knows who the users are, runs benign
and poisoned rounds, and measures a model the way every experiment reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fedmeta import attack, checkpoint, episodes, evaluation, fast, federation, reptile, runtime, seeding
from fedmeta.adam import AdamConfig
from fedmeta.backend import Backend
from fedmeta.checkpoint import Resume, ThetaSpec
from fedmeta.config import Config
from fedmeta.engine.deployment import FlowerDeployment
from fedmeta.evaluation import Learner, Summary
from fedmeta.model import Theta
from fedmeta.scenarios import USERS_TAG, Scenario, scenarios_of
from fedmeta.splits import FederatedData


@dataclass(frozen=True)
class LocalWork:
    """A round's local training: the applied users (in `Selection.applied` order) and each one's model after
    it; Experiment 4 lets every server rule aggregate the same work."""

    key: str  # the round's seed path (federation.round_key)
    users: list[int]
    local: list[Theta]


class Experiment:
    """The paper's setting over one prepared dataset: who the M users are (the attacker among them), the
    server's rounds (benign, or the attack round with the attacker's boosted update) and the two
    measurements every figure reports (meta-test accuracy; main-task and backdoor accuracy per scenario).

    Each pipeline stage builds one from params.yaml and the prepared data (`from_prepared`); Experiments 1-4 differ
    only in which rounds they run and which learner (`finetuner` or the matching defense) they measure with."""

    def __init__(self, params: Config, data: FederatedData, device: torch.device) -> None:
        self.params, self.data, self.device = params, data, device
        self.images = data.images.to(device)
        fed = params.federation
        self.attacker = fed.attacker
        self.benign = [u for u in range(fed.users) if u != fed.attacker]
        self.adam = AdamConfig(lr=params.budget.inner_lr, beta2=params.reptile.beta2)
        # how episodes are computed (FEDMETA_ADAPT), chosen once here and passed to every computation
        self.backend: Backend = fast.backend(device)
        self.flower: FlowerDeployment | None = None  # started at the first round when federation.engine is flower
        # by round: whom a filtering rule (multi_krum, flame) kept and rejected, for Experiment 4's detection rates
        self.screenings: dict[int, federation.Screening] = {}

    @classmethod
    def from_prepared(cls, params: Config) -> Experiment:
        """What a stage runs on: `params` over the prepared dataset (checked to be prepared for them), on the
        configured device."""
        return cls(params, FederatedData.load(runtime.PREPARED, params), runtime.device_of(params))

    def load_theta(self, path: Path) -> Theta:
        """The model of checkpoint `path` on this experiment's device, refused unless it is the configured Conv4
        (`theta_spec`)."""
        return checkpoint.load_theta(path, self.device, self.theta_spec())

    def theta_spec(self) -> ThetaSpec:
        """The model every checkpoint this experiment reads must be: the profile's width, the prepared images,
        reptile.n_way."""
        p = self.params
        source = f"; from profiles.{p.profile}.width, the prepared {p.dataset} images and reptile.n_way"
        return ThetaSpec(p.budget.width, self.images.shape[1], self.images.shape[-1], p.reptile.n_way, source)

    def gen(self, *path: object) -> torch.Generator:
        return seeding.generator(self.params.seed, *path)

    def classes(self, user: int, include_backdoor: bool) -> list[int]:
        if user == self.attacker:
            return self.data.user_classes[user]
        return self.data.user_data(user, include_backdoor)

    def dataset_size(self, user: int, include_backdoor: bool) -> int:
        """|D_i|: how many training images user `user` holds (α_i's weight under federation.weighting: size)."""
        return sum(len(self.data.train_idx[c]) for c in self.classes(user, include_backdoor))

    def _benign_local(self, theta: Theta, user: int, rnd: str, include_backdoor: bool) -> Theta:
        return self._reptile(theta, self.classes(user, include_backdoor), self.gen("local", rnd, user))

    def _reptile(self, theta: Theta, classes: list[int], g: torch.Generator) -> Theta:
        """A benign user's local training from θ_G = `theta`: Reptile on episodes of `classes`, drawn from `g`."""
        r, shots = self.params.reptile, self.params.spec.train_shots

        def sample(count: int, g: torch.Generator) -> episodes.Episodes:
            return episodes.training(self.data, classes, r.n_way, shots, count, g)

        return reptile.meta_train(
            theta,
            self.images,
            sample,
            self.params.budget.episodes_per_round,
            r,
            r.inner_steps,
            self.params.budget.outer_step,
            self.adam,
            g,
            backend=self.backend,
        )

    def local_model(
        self, theta: Theta, user: int, rnd: int, key: str, include_backdoor: bool, resume: Resume | None = None
    ) -> Theta:
        """User `user`'s model after its local training of round `rnd` (`key`: its seed path) from θ_G = `theta`:
        Reptile on its own episodes, or the attacker's poisoned training (`resume`: resumable)."""
        if user == self.attacker:
            g = self.gen("attack", rnd)
            keep = self.neurotoxin_keep(theta, rnd) if self.params.attack.kind == "neurotoxin" else None
            return attack.train(
                self.params, self.data, self.images, theta, rnd, g, resume, backend=self.backend, keep=keep
            )
        return self._benign_local(theta, user, key, include_backdoor)

    def neurotoxin_keep(self, theta: Theta, rnd: int) -> Theta:
        """Neurotoxin's mask for the attack in round `rnd` (`attack.keep_mask`, docs/attacks.md). Its benign update
        is the one the attacker makes itself from θ_G = `theta`, as a benign user, on its own clean classes: no
        aggregate reaches it before round 1 (it is never selected in pretraining, and fedmeta keeps only the
        pretrained model), and the benign users of this round start from the same θ_G."""
        benign = self._reptile(theta, self.classes(self.attacker, False), self.gen("neurotoxin", rnd))
        return attack.keep_mask(federation.update(benign, theta), self.params.attack.neurotoxin_topk)

    def upload(self, theta: Theta, user: int, local: Theta) -> Theta:
        """What user `user` sends the server after training `local` from `theta`: δ = θ_local − θ_G, the attacker's
        boosted (`attack.boosted_update`). Under secure aggregation the server cannot clip a masked update, so an
        honest client clips its own when the rule asks; the attacker's client need not."""
        fed = self.params.federation
        if user == self.attacker:
            return attack.boosted_update(local, theta, self.params)
        delta = federation.update(local, theta)
        return federation.client_side(delta, fed) if fed.secure_aggregation else delta

    def local_work(
        self, theta: Theta, rnd: int, include_backdoor: bool, with_attacker: bool = False, resume: Resume | None = None
    ) -> LocalWork:
        """The users' side of a round: who is applied and what each trained (the attacker's model before it
        boosts). It depends on neither the server's rule nor secure aggregation nor the boost, so Experiment 4's
        rules can all aggregate the same work (`round(..., work=)`)."""
        key = federation.round_key(rnd, False)
        users = federation.select(self.params, key, with_attacker).applied
        return LocalWork(key, users, [self.local_model(theta, u, rnd, key, include_backdoor, resume) for u in users])

    def round(
        self,
        theta: Theta,
        rnd: int,
        include_backdoor: bool,
        with_attacker: bool = False,
        resume: Resume | None = None,
        pretraining: bool = False,
        work: LocalWork | None = None,
    ) -> Theta:
        """One federated round (Section 2): the server selects M_min users (the attacker among them in the attack
        round), each trains locally from θ_G and uploads its δ, and the server aggregates them into the new θ_G.
        `resume`: the attacker's training is resumable (benign users are cheap and replayed); `work`: the users'
        local models, already trained (local engine only)."""
        key = federation.round_key(rnd, pretraining)
        if self.params.federation.engine == "flower":  # the same round, the users in their own processes
            if self.flower is None:
                self.flower = FlowerDeployment(self.params, self.data)
            return self._served(rnd, self.flower.round(theta, rnd, key, include_backdoor, with_attacker, resume))

        def train(user: int) -> Theta:
            return self.local_model(theta, user, rnd, key, include_backdoor, resume)

        def clients(selection: federation.Selection) -> federation.Uploads:
            users = work.users if work is not None else selection.applied
            local = work.local if work is not None else [train(u) for u in users]
            uploads = [self.upload(theta, u, m) for u, m in zip(users, local)]
            return federation.Uploads(users, uploads, [self.dataset_size(u, include_backdoor) for u in users])

        return self._served(rnd, federation.server_round(self.params, theta, key, with_attacker, clients))

    def _served(self, rnd: int, served: federation.Served) -> Theta:
        if served.screening is not None:
            self.screenings[rnd] = served.screening
        return served.theta

    def close(self) -> None:
        """Stop this experiment's Flower federation, if it started one (a stage that runs several experiments
        frees the ports before the next starts; otherwise process exit does it)."""
        if self.flower is not None:
            self.flower.close()
            self.flower = None

    def finetuner(self) -> evaluation.FineTune:
        """The paper's benign user: Adam from the shared θ, its classifier as `evaluation.head` sets it."""
        e = self.params.evaluation
        return evaluation.FineTune(
            AdamConfig(lr=e.lr, beta2=self.params.reptile.beta2), e.bn_mode, self.backend, e.head
        )

    def meta_test(
        self, theta: Theta, learner: Learner, record_at: list[int], tag: str, count: int | None = None
    ) -> list[dict[str, Summary]]:
        """Accuracy on `count` (default: the budget's eval_episodes) episodes of unseen classes; the same
        episodes at every call with the same tag, and a larger count draws more after the same first ones."""
        e = self.params.evaluation
        count = count or self.params.budget.eval_episodes
        eps = episodes.evaluation(self.data, self.data.meta_test, e.n_way, e.k_shot, count, self.gen("meta-test", tag))
        points = evaluation.run(learner, theta, self.images, eps, e, record_at, self.gen("meta-test-batches", tag))
        return [{"meta_test": pt["main"]} for pt in points]

    def measure(
        self, theta: Theta, variant: str, learner: Learner, steps: int, tag: str
    ) -> dict[str, dict[str, float]]:
        """What Experiments 1 and 4 record after a round: meta-test accuracy and, per scenario of `variant`,
        main-task and backdoor accuracy on the attack-evaluation episodes of all benign users' classes
        (means and 95 % half-widths, after `steps` fine-tuning steps of `learner`)."""
        meta = flat(self.meta_test(theta, learner, [steps], tag)[0])
        return {
            s.name: {**meta, **flat(self.attack_eval(theta, learner, s, [steps], tag)[0])}
            for s in scenarios_of(variant)
        }

    def eval_classes(self, scenario: Scenario, user: int | None) -> tuple[list[int], tuple[int, ...]]:
        """Classes of the fine-tuning episodes and those always present: the target, plus in (c) the
        backdoor classes; in (a) and (b) backdoor classes never appear, whatever pretraining saw."""
        d = self.data
        users = self.benign if user is None else [user]
        must = (d.target, *(d.backdoor if scenario.backdoor_in_finetuning else ()))
        return sorted({c for u in users for c in self.classes(u, False)} | set(must)), must

    def configured_target(self) -> int | None:
        """The target's output that `evaluation.target_output` asks for: N − 1 (last) or a random one (None)."""
        e = self.params.evaluation
        return e.n_way - 1 if e.target_output == "last" else None

    def attack_eval(
        self,
        theta: Theta,
        learner: Learner,
        scenario: Scenario,
        record_at: list[int],
        tag: str,
        user: int | None = None,
        target_at: int | None | Literal["configured"] = "configured",
    ) -> list[dict[str, Summary]]:
        """Main-task and backdoor accuracy on meta-training episodes that always include the target.

        `user` restricts the episodes to that user's classes (Experiments 2-3); otherwise all benign users' classes.
        `target_at` puts the target at that output in every episode (None: a random one); by default where
        `evaluation.target_output` says."""
        e, d = self.params.evaluation, self.data
        pool, must = self.eval_classes(scenario, user)
        g = self.gen("attack-eval", scenario.name, tag, user)
        at = self.configured_target() if target_at == "configured" else target_at
        eps = episodes.evaluation(d, pool, e.n_way, e.k_shot, self.params.budget.eval_episodes, g, must, at)
        probes = {"attack_train": d.attack_train_idx.to(self.device), "attack_val": d.attack_val_idx.to(self.device)}
        return evaluation.run(
            learner,
            theta,
            self.images,
            eps,
            e,
            record_at,
            self.gen("attack-eval-batches", scenario.name, tag, user),
            probes,
        )


def flat(point: dict[str, Summary]) -> dict[str, float]:
    """{'main': Summary} → {'main': mean, 'main_ci95': half-width}, rounded for stable, readable files."""
    out: dict[str, float] = {}
    for k, s in point.items():
        out[k] = round(s.mean, 6)
        out[f"{k}_ci95"] = round(s.ci95, 6)
    return out


def record_points(steps: int, every: int) -> list[int]:
    return sorted({0, steps, *range(every, steps, every)})


def user_curves(
    exp: Experiment, theta: Theta, learner: Learner, variant: str
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Experiments 2-3: every benign user fine-tunes the attacked model on its own episodes;
    one curve per (scenario, user) of meta-test, main-task and backdoor accuracy against fine-tuning steps."""
    b = exp.params.budget
    at = record_points(b.finetune_steps, b.record_every)
    curves: dict[tuple[str, int], list[dict[str, float]]] = {}
    # Meta-test accuracy does not depend on the user (same θ, unseen classes): one set of episodes serves all.
    meta = exp.meta_test(theta, learner, at, USERS_TAG)
    for user in exp.benign:
        for scenario in scenarios_of(variant):
            attack = exp.attack_eval(theta, learner, scenario, at, USERS_TAG, user)
            curves[(scenario.name, user)] = [{"step": s, **flat(m), **flat(a)} for s, m, a in zip(at, meta, attack)]
    return curves
