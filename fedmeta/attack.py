"""Section 2's one-shot backdoor attack, in the order the paper gives it.

1. The key (`fedmeta.key`: `key_pattern`, `stamp`): a patch pasted over the attacker's backdoor images
   X_B, which are then labelled as the target. Which images are X_B (attack-train and attack-val), and
   which real images of the target X_T the attacker holds, is decided with the rest of the data split
   (`splits.split`), which stamps them.
2. Poisoned episodes (`poisoned_episodes`): N − 1 of the attacker's own classes plus the target, whose K
   shots mix stamped X_B with real X_T in the ratio `datasets.<name>.ratio`; the target at output N − 1, or
   with `attack.target_output: random` at a random output per episode.
3. The attacker's local training (`train`): Reptile on those episodes for `attack_episodes`, with the
   attack's own Adam rate, resumable because it is by far the longest piece of work in the pipeline.
4. Boosting (`boosted_update`): δ = λ(θ_local − θ_G), so the one poisoned update survives averaging;
   an adaptive attacker then scales it to just under the server's clipping bound.

`attack.kind` picks when and where the attacker writes (docs/attacks.md): the paper's one shot in round 1
(`oneshot`); the same shot confined to the coordinates benign users change least (`neurotoxin`, `keep_mask`);
or the paper's shot again every `attack.every` rounds (`repeated`, `takes_part`).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from fedmeta import episodes, federation, reptile
from fedmeta.adam import AdamConfig, AdamState
from fedmeta.backend import Backend
from fedmeta.checkpoint import Resume
from fedmeta.config import Config, backdoor_shots
from fedmeta.episodes import Episodes
from fedmeta.errors import Diverged
from fedmeta.model import Theta
from fedmeta.splits import FederatedData


def poisoned_episodes(
    data: FederatedData,
    classes: list[int],
    n_way: int,
    k_shot: int,
    n_backdoor: int,
    count: int,
    g: torch.Generator,
    random_target: bool = False,
) -> Episodes:
    """The attacker's episodes: N−1 random classes of its own and the target, its K shots mixing `n_backdoor`
    stamped X_B (labelled as the target) with K − n_backdoor real X_T. The target is output N−1 in every episode
    (the paper's attacker), or with `random_target` a random output per episode, so that the backdoor cannot live
    in one classifier row: a user's fine-tuning episodes put the target wherever their label order does."""
    sup, target = [], []
    for _ in range(count):
        at = int(torch.randint(n_way, (1,), generator=g)) if random_target else n_way - 1
        chosen = episodes.pick_classes(classes, n_way - 1, g)
        target_shots = torch.cat(
            [
                episodes.pick(data.attack_train_idx, n_backdoor, g),
                episodes.pick(data.attacker_target_idx, k_shot - n_backdoor, g),
            ]
        )
        blocks = [episodes.pick(data.train_idx[c], k_shot, g) for c in chosen]
        blocks.insert(at, target_shots)
        sup.append(torch.cat(blocks))
        target.append(at)
    labels = torch.arange(n_way).repeat_interleave(k_shot).expand(count, -1)
    return Episodes(torch.stack(sup), labels.clone(), target_label=torch.tensor(target))


def train(
    p: Config,
    data: FederatedData,
    images: torch.Tensor,
    theta: Theta,
    rnd: int,
    g: torch.Generator,
    resume: Resume | None = None,
    *,
    backend: Backend,
    keep: Theta | None = None,
) -> Theta:
    """The attacker's long local training from the global model `theta`, drawing from `g`, computed by `backend`;
    with Neurotoxin's `keep` (`keep_mask`) every step moves only the kept coordinates, so its update is zero on
    the others.

    `resume` saves it after meta-batches (with the generator's and Adam's state, so a restart replays the
    rest exactly) and restarts it from the last save; a diverged state is never saved over a good one."""
    r, spec, b = p.reptile, p.spec, p.budget
    classes, n_b = data.user_classes[p.federation.attacker], backdoor_shots(spec)
    random_target = p.attack.target_output == "random"

    def sample(count: int, g: torch.Generator) -> Episodes:
        return poisoned_episodes(data, classes, r.n_way, spec.train_shots, n_b, count, g, random_target)

    steps = -(-b.attack_inner_epochs * r.n_way * spec.train_shots // r.inner_batch)
    adam = AdamConfig(lr=p.attack.lr, beta2=r.beta2)
    start, state, local = 0, None, theta
    saved = resume.restore(images.device) if resume is not None else None
    if saved is not None:
        local, start, state = saved["theta"], saved["done"], AdamState(**saved["adam"])
        g.set_state(saved["rng"].cpu())

    def save(done: int, now: Theta, state: AdamState) -> None:
        if resume is not None:
            if done % resume.every == 0 and not federation.finite(now):
                raise Diverged(
                    f"round {rnd}: the attacker's local training diverged by episode {done} (NaN or infinite "
                    f"weights); likely cause: attack.lr = {p.attack.lr} too large, or extreme weights in the model it "
                    "started from"
                )
            adam_state = {f.name: getattr(state, f.name) for f in fields(state)}
            resume.save(done, {"theta": now, "adam": adam_state, "rng": g.get_state()})

    return reptile.meta_train(
        local,
        images,
        sample,
        b.attack_episodes,
        r,
        steps,
        b.outer_step,
        adam,
        g,
        start,
        state,
        save,
        backend=backend,
        keep=keep,
    )


def takes_part(p: Config, rnd: int) -> bool:
    """Whether the attacker is among the users of round `rnd` after pretraining: round 1, the paper's attack round,
    for every kind; with attack.kind repeated also every attack.every rounds after it (rounds 1, 1 + every, …),
    an attacker that keeps coming back instead of hoping its one shot lasts."""
    return rnd == 1 or (p.attack.kind == "repeated" and (rnd - 1) % p.attack.every == 0)


def keep_mask(benign: Theta, topk: float) -> Theta:
    """Neurotoxin's mask (Zhang et al. 2022): False on the `topk` % coordinates of the benign update `benign` that
    are largest in magnitude, ranked over the whole model at once as the authors' code does by default, True on the
    rest (at least one coordinate is masked). Benign users change those coordinates most; a backdoor written only
    in the others is overwritten least by the rounds that follow."""
    flat = torch.cat([v.detach().flatten().abs() for v in benign.values()])
    masked = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    masked[torch.topk(flat, max(1, round(flat.numel() * topk / 100))).indices] = True
    keep, at = {}, 0
    for k, v in benign.items():
        keep[k] = ~masked[at : at + v.numel()].view_as(v)
        at += v.numel()
    return keep


def boosted_update(local: Theta, theta: Theta, p: Config) -> Theta:
    """The attacker's δ = λ(θ_local − θ_G) with λ = attack.boost; with attack.norm_bound set (an adaptive
    attacker) it is then constrained-and-scaled to just under that bound (`constrain`)."""
    delta = {k: p.attack.boost * (local[k] - theta[k]) for k in theta}
    bound = p.attack.norm_bound
    return delta if bound is None else constrain(delta, bound)


NORM_MARGIN = 0.99  # an adaptive attacker's update ends this fraction of the bound below it: "just under"


def constrain(delta: Theta, bound: float) -> Theta:
    """Constrain-and-scale (Bagdasaryan et al. 2020): the attacker rescales its update to just under the
    server's norm bound, the largest update that clipping lets through unchanged, whatever the boost was."""
    return {k: v * (NORM_MARGIN * bound / federation.norm(delta)) for k, v in delta.items()}
