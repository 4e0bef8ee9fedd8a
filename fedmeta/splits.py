"""Who holds which images: meta-train/meta-test classes, users, and the attack sets.

Everything is decided once, at preparation time, from the seed, and saved as
index tensors into one image tensor. Attack classes are reserved by *group*,
so no rotation of a target or backdoor character reaches anyone else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fedmeta import backdoor, checkpoint, seeding
from fedmeta.config import Params
from fedmeta.data.imageset import ImageSet
from fedmeta.errors import FedmetaError


@dataclass
class FederatedData:
    images: torch.Tensor  # uint8 [n, C, H, W]; stamped copies are appended after the originals
    labels: torch.Tensor  # true class of every image (a stamped image keeps its backdoor class)
    class_names: list[str]
    train_idx: list[torch.Tensor]  # per class: examples users train on
    val_idx: list[torch.Tensor]  # per class: held-out examples (queries of evaluation episodes)
    user_classes: list[list[int]]  # per user: its meta-training classes, attack classes excluded
    meta_test: list[int]
    target: int
    backdoor: list[int]
    attack_owner: list[int]  # benign user holding each attack class [target, *backdoor]
    attacker_target_idx: torch.Tensor  # X_T
    attack_train_idx: torch.Tensor  # X_B: stamped, labelled as the target by the attacker
    attack_val_idx: torch.Tensor  # stamped, never trained on

    def save(self, path: Path) -> None:
        checkpoint.save(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "FederatedData":
        if not path.is_file():
            raise FedmetaError(f"{path}: prepared dataset not found; run `fedmeta prepare` (or `dvc repro prepare`) first")
        raw = checkpoint.load(path, tuple(f.name for f in fields(cls)), what="prepared dataset")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})

    def user_data(self, user: int, include_backdoor: bool) -> list[int]:
        """A benign user's classes; the target always, backdoor classes only in scenarios (b)/(c)."""
        attack = [self.target, *self.backdoor]
        extra = [c for c, owner in zip(attack, self.attack_owner) if owner == user and (include_backdoor or c == self.target)]
        return self.user_classes[user] + extra


def _take(perm: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for n in counts:
        out.append(perm[start : start + n])
        start += n
    return out


def split(data: ImageSet, params: Params) -> FederatedData:
    spec, fed = params.spec, params.federation
    g = seeding.generator(params.seed, "split")
    n_classes = len(data.class_names)
    by_class = [torch.nonzero(data.labels == c).flatten() for c in range(n_classes)]
    n_groups = int(data.groups.max()) + 1
    group_classes = [torch.nonzero(data.groups == k).flatten().tolist() for k in range(n_groups)]

    if data.fixed_split is not None:
        train_pool, meta_test = list(data.fixed_split["train"]), list(data.fixed_split["test"])
        train_groups = [[c] for c in train_pool]
    else:
        order = torch.randperm(n_groups, generator=g).tolist()
        n_test = round(n_groups * spec.meta_test_fraction)
        meta_test = sorted(c for k in order[:n_test] for c in group_classes[k])
        train_groups = [group_classes[k] for k in order[n_test:]]
    ds, n_attack, n_way = params.dataset, 1 + spec.backdoor_classes, params.reptile.n_way
    if n_attack >= len(train_groups):
        raise FedmetaError(
            f"params.yaml: datasets.{ds}.backdoor_classes: {spec.backdoor_classes} plus the target take all {len(train_groups)} "
            f"meta-training class groups (a character's rotations are one group), leaving none to benign users; allowed: at most {len(train_groups) - 2}"
        )
    if len(meta_test) < params.evaluation.n_way:
        raise FedmetaError(
            f"params.yaml: evaluation.n_way: {params.evaluation.n_way} exceeds the {len(meta_test)} meta-test classes; "
            f"allowed: at most {len(meta_test)} (or a larger datasets.{ds}.meta_test_fraction)"
        )
    # Attack classes: one class of each of the first groups; the group's other classes are dropped.
    attack = [grp[int(torch.randint(len(grp), (1,), generator=g))] for grp in train_groups[:n_attack]]
    benign_classes = [c for grp in train_groups[n_attack:] for c in grp]
    per_user = [benign_classes[u :: fed.users] for u in range(fed.users)]
    fewest = min(len(c) for c in per_user)
    if fewest < n_way:
        raise FedmetaError(
            f"params.yaml: reptile.n_way: {n_way} exceeds the {fewest} meta-training classes a user holds "
            f"({len(benign_classes)} benign classes among federation.users = {fed.users}); allowed: at most {fewest}"
        )

    train_idx = [torch.empty(0, dtype=torch.int64) for _ in range(n_classes)]
    val_idx = [torch.empty(0, dtype=torch.int64) for _ in range(n_classes)]
    for c in benign_classes + meta_test:
        perm = by_class[c][torch.randperm(len(by_class[c]), generator=g)]
        if c in meta_test:
            if len(perm) < params.evaluation.k_shot + 1:
                raise FedmetaError(
                    f"params.yaml: evaluation.k_shot: {params.evaluation.k_shot} shots plus 1 query exceed the {len(perm)} examples of "
                    f"meta-test class {data.class_names[c]}; allowed: at most {len(perm) - 1}"
                )
            train_idx[c] = perm
            continue
        left = len(perm) - spec.validation_per_class  # a meta-training class's examples to train (and fine-tune) on
        if left < 1:
            raise FedmetaError(
                f"params.yaml: datasets.{ds}.validation_per_class: {spec.validation_per_class} leaves no training examples of class "
                f"{data.class_names[c]}, which has {len(perm)}; allowed: at most {len(perm) - 1}"
            )
        for key, shots in ((f"datasets.{ds}.train_shots", spec.train_shots), ("evaluation.k_shot", params.evaluation.k_shot)):
            if shots > left:
                raise FedmetaError(
                    f"params.yaml: {key}: {shots} shots exceed the {left} training examples of class {data.class_names[c]} "
                    f"({len(perm)} minus datasets.{ds}.validation_per_class = {spec.validation_per_class}); allowed: at most {left}"
                )
        val_idx[c], train_idx[c] = _take(perm, [spec.validation_per_class, left])

    needed = spec.benign_examples + spec.attacker_examples + spec.validation_examples
    images, labels = [data.images], [data.labels]
    n_next = len(data.labels)
    x_t, x_b, x_v = torch.empty(0, dtype=torch.int64), [], []
    for i, c in enumerate(attack):
        if len(by_class[c]) < needed:
            raise FedmetaError(
                f"params.yaml: datasets.{ds}: benign_examples + attacker_examples + validation_examples = {needed} exceed the "
                f"{len(by_class[c])} examples of attack class {data.class_names[c]}; allowed: a sum of at most {len(by_class[c])}"
            )
        perm = by_class[c][torch.randperm(len(by_class[c]), generator=g)]
        benign, attacker, held = _take(perm, [spec.benign_examples, spec.attacker_examples, spec.validation_examples])
        train_idx[c] = benign
        if i == 0:
            x_t = attacker
            continue
        for chosen, dest in ((attacker, x_b), (held, x_v)):
            images.append(backdoor.stamp(data.images[chosen], params.key))
            labels.append(data.labels[chosen])
            dest.append(torch.arange(n_next, n_next + len(chosen)))
            n_next += len(chosen)
    benign_users = [u for u in range(fed.users) if u != fed.attacker]
    owners = [benign_users[i % len(benign_users)] for i in range(n_attack)]
    return FederatedData(
        images=torch.cat(images),
        labels=torch.cat(labels),
        class_names=list(data.class_names),
        train_idx=train_idx,
        val_idx=val_idx,
        user_classes=per_user,
        meta_test=meta_test,
        target=attack[0],
        backdoor=attack[1:],
        attack_owner=owners,
        attacker_target_idx=x_t,
        attack_train_idx=torch.cat(x_b),
        attack_val_idx=torch.cat(x_v),
    )
