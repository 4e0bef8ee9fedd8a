"""Who holds which images: meta-train/meta-test classes, users, and the attack sets.

Everything is decided once, at preparation time, from the seed, and saved as
index tensors into one image tensor. Attack classes are reserved by *group*,
so no rotation of a target or backdoor character reaches anyone else.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fedmeta import checkpoint, seeding
from fedmeta.config import Config
from fedmeta.data.imageset import ImageSet
from fedmeta.errors import FedmetaError
from fedmeta.key import stamp


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

    def save(self, path: Path, now: bool = False) -> None:
        checkpoint.save(path, asdict(self), now)

    @classmethod
    def load(cls, path: Path, params: Config | None = None) -> FederatedData:
        """The prepared dataset, its fields checked by type and range; with `params`, also against them
        (image size and channels, users, attack classes), so a dataset prepared for other settings is refused."""
        if not path.is_file():
            raise FedmetaError(
                f"{path}: prepared dataset not found; run `fedmeta prepare` (or `dvc repro prepare`) first"
            )
        raw = checkpoint.load(path, tuple(f.name for f in fields(cls)), what="prepared dataset")
        _check_fields(raw, path)
        if params is not None:
            _check_against(raw, path, params)
        return cls(**{f.name: raw[f.name] for f in fields(cls)})

    def digest(self) -> str:
        """sha256 of every field: processes on different machines (Flower's workers across machines) hold the same
        prepared dataset, split and stamped images included, exactly when their digests agree."""
        h = hashlib.sha256()

        def feed(value: object) -> None:
            if isinstance(value, torch.Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(value.contiguous().numpy().tobytes())
            elif isinstance(value, list):
                h.update(b"[%d" % len(value))
                for item in value:
                    feed(item)
            else:
                h.update(repr(value).encode())

        for f in fields(self):
            h.update(f.name.encode())
            feed(getattr(self, f.name))
        return h.hexdigest()

    def user_data(self, user: int, include_backdoor: bool) -> list[int]:
        """A benign user's classes; the target always, backdoor classes only in scenarios (b)/(c)."""
        classes = [self.target, *self.backdoor]
        extra = [
            c
            for c, owner in zip(classes, self.attack_owner)
            if owner == user and (include_backdoor or c == self.target)
        ]
        return self.user_classes[user] + extra


_INDEX_TENSORS = ("attacker_target_idx", "attack_train_idx", "attack_val_idx")
_INT_LISTS = ("meta_test", "backdoor", "attack_owner")
REPREPARE = "re-run `fedmeta prepare` (or `dvc repro prepare`)"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _index_tensor(v: object) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.dim() == 1


def _check_fields(raw: dict, path: Path) -> None:
    """Each field's type, and every index inside what it indexes: one line naming the field, never an IndexError
    later."""

    def bad(field: str, expected: str) -> FedmetaError:
        value = raw[field]
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        return FedmetaError(f"{path}: prepared dataset field {field!r} is {got}; expected {expected}")

    images, labels, names = raw["images"], raw["labels"], raw["class_names"]
    if not (
        isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[0] > 0
    ):
        raise bad("images", "a non-empty uint8 tensor [n, C, H, W]")
    n = images.shape[0]
    if not (_index_tensor(labels) and labels.shape[0] == n):
        raise bad("labels", f"an int64 tensor [{n}], one label per image")
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise bad("class_names", "a non-empty list of strings")
    n_classes = len(names)
    for field in ("train_idx", "val_idx"):
        v = raw[field]
        if not (isinstance(v, list) and len(v) == n_classes and all(_index_tensor(t) for t in v)):
            raise bad(field, f"a list of {n_classes} int64 index tensors, one per class")
    for field in _INDEX_TENSORS:
        if not _index_tensor(raw[field]):
            raise bad(field, "an int64 index tensor")
    users = raw["user_classes"]
    if not (
        isinstance(users, list) and users and all(isinstance(u, list) and all(_is_int(c) for c in u) for u in users)
    ):
        raise bad("user_classes", "a non-empty list of lists of class indices, one per user")
    for field in _INT_LISTS:
        if not (isinstance(raw[field], list) and all(_is_int(c) for c in raw[field])):
            raise bad(field, "a list of integers")
    if not _is_int(raw["target"]):
        raise bad("target", "a class index (an integer)")
    tensors = (
        [("labels", labels, n_classes)]
        + [(f, t, n) for f in ("train_idx", "val_idx") for t in raw[f]]
        + [(f, raw[f], n) for f in _INDEX_TENSORS]
    )
    for field, t, bound in tensors:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise FedmetaError(f"{path}: prepared dataset field {field!r} holds an index outside 0..{bound - 1}")
    classes = [("target", [raw["target"]]), ("meta_test", raw["meta_test"]), ("backdoor", raw["backdoor"])] + [
        ("user_classes", u) for u in users
    ]
    for field, values in classes:
        if any(not 0 <= c < n_classes for c in values):
            raise FedmetaError(
                f"{path}: prepared dataset field {field!r} holds a class index outside 0..{n_classes - 1}"
            )
    if len(raw["attack_owner"]) != 1 + len(raw["backdoor"]) or any(
        not 0 <= u < len(users) for u in raw["attack_owner"]
    ):
        raise FedmetaError(
            f"{path}: prepared dataset field 'attack_owner' must name one of the {len(users)} users for the target "
            "and each backdoor class"
        )


def _check_against(raw: dict, path: Path, params: Config) -> None:
    """The dataset was prepared for these parameters: image shape, users and attack classes as params.yaml sets them."""
    ds = params.dataset
    side = params.omniglot.image_size if ds == "omniglot" else params.miniimagenet.image_size
    channels = 1 if ds == "omniglot" else 3
    got = tuple(raw["images"].shape[1:])
    if got != (channels, side, side):
        raise FedmetaError(
            f"{path}: prepared images are {got[1]}×{got[2]} with {got[0]} channel(s); "
            f"params.yaml expects {side}×{side} with {channels} ({ds}.image_size = {side}, dataset = {ds}); {REPREPARE}"
        )
    users, spec = len(raw["user_classes"]), params.spec
    if users != params.federation.users:
        raise FedmetaError(
            f"{path}: prepared for {users} users; params.yaml federation.users = {params.federation.users}; {REPREPARE}"
        )
    if len(raw["backdoor"]) != spec.backdoor_classes:
        raise FedmetaError(
            f"{path}: prepared with {len(raw['backdoor'])} backdoor classes; "
            f"params.yaml datasets.{ds}.backdoor_classes = {spec.backdoor_classes}; {REPREPARE}"
        )
    fewest = min(len(u) for u in raw["user_classes"])
    if fewest < params.reptile.n_way:
        raise FedmetaError(
            f"{path}: a user holds {fewest} classes, "
            f"fewer than params.yaml reptile.n_way = {params.reptile.n_way}; {REPREPARE}"
        )
    if len(raw["meta_test"]) < params.evaluation.n_way:
        raise FedmetaError(
            f"{path}: {len(raw['meta_test'])} meta-test classes, "
            f"fewer than params.yaml evaluation.n_way = {params.evaluation.n_way}; {REPREPARE}"
        )


def _take(perm: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for n in counts:
        out.append(perm[start : start + n])
        start += n
    return out


def split(data: ImageSet, params: Config) -> FederatedData:
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
    # the target, a backdoor class and a benign class: 3 groups at least
    if data.fixed_split is None and len(train_groups) < 3:

        def most(groups_left: int) -> str:  # the largest fraction that leaves `groups_left` groups to meta-training
            return f"{math.floor((n_groups - groups_left) / n_groups * 1e4) / 1e4:g}"

        if n_groups < 4:
            allowed = (
                f"none: the data holds {n_groups} class groups, "
                "and a meta-test group, the target, a backdoor and a benign group need 4"
            )
        elif n_groups - n_attack - 1 < 1:
            allowed = f"at most {most(3)} with fewer datasets.{ds}.backdoor_classes"
        else:
            allowed = (
                f"at most {most(n_attack + 1)} "
                f"(leaving the target, {spec.backdoor_classes} backdoor and a benign group)"
            )
        raise FedmetaError(
            f"params.yaml: datasets.{ds}.meta_test_fraction: {spec.meta_test_fraction} "
            f"puts {n_groups - len(train_groups)} of the {n_groups} class groups "
            f"in meta-test, leaving {len(train_groups)} for meta-training; allowed: {allowed}"
        )
    if data.fixed_split is None and not meta_test:
        # groups giving evaluation.n_way classes
        needed = -(-params.evaluation.n_way // max(len(grp) for grp in group_classes))
        least = math.ceil(min(n_groups, needed) / n_groups * 1e4) / 1e4
        raise FedmetaError(
            f"params.yaml: datasets.{ds}.meta_test_fraction: {spec.meta_test_fraction} "
            f"of {n_groups} class groups puts none in meta-test; allowed: at least {least:g}"
        )
    if n_attack >= len(train_groups):
        raise FedmetaError(
            f"params.yaml: datasets.{ds}.backdoor_classes: {spec.backdoor_classes} plus the target "
            f"take all {len(train_groups)} meta-training class groups (a character's rotations are one group), "
            f"leaving none to benign users; allowed: at most {len(train_groups) - 2}"
        )
    if len(meta_test) < params.evaluation.n_way:
        raise FedmetaError(
            f"params.yaml: evaluation.n_way: {params.evaluation.n_way} exceeds the {len(meta_test)} meta-test classes; "
            f"allowed: at most {len(meta_test)} (or a larger datasets.{ds}.meta_test_fraction)"
        )
    # Attack classes: one class of each of the first groups; the group's other classes are dropped.
    attack_classes = [grp[int(torch.randint(len(grp), (1,), generator=g))] for grp in train_groups[:n_attack]]
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
                    f"params.yaml: evaluation.k_shot: {params.evaluation.k_shot} shots plus 1 query "
                    f"exceed the {len(perm)} examples of meta-test class {data.class_names[c]}; "
                    f"allowed: at most {len(perm) - 1}"
                )
            train_idx[c] = perm
            continue
        left = len(perm) - spec.validation_per_class  # a meta-training class's examples to train (and fine-tune) on
        if left < 1:
            raise FedmetaError(
                f"params.yaml: datasets.{ds}.validation_per_class: {spec.validation_per_class} "
                f"leaves no training examples of class {data.class_names[c]}, which has {len(perm)}; "
                f"allowed: at most {len(perm) - 1}"
            )
        for key, shots in (
            (f"datasets.{ds}.train_shots", spec.train_shots),
            ("evaluation.k_shot", params.evaluation.k_shot),
        ):
            if shots > left:
                raise FedmetaError(
                    f"params.yaml: {key}: {shots} shots exceed the {left} training examples "
                    f"of class {data.class_names[c]} "
                    f"({len(perm)} minus datasets.{ds}.validation_per_class = {spec.validation_per_class}); "
                    f"allowed: at most {left}"
                )
        val_idx[c], train_idx[c] = _take(perm, [spec.validation_per_class, left])

    needed = spec.benign_examples + spec.attacker_examples + spec.validation_examples
    images, labels = [data.images], [data.labels]
    n_next = len(data.labels)
    x_t, x_b, x_v = torch.empty(0, dtype=torch.int64), [], []
    for i, c in enumerate(attack_classes):
        if len(by_class[c]) < needed:
            raise FedmetaError(
                f"params.yaml: datasets.{ds}: benign_examples + attacker_examples + validation_examples = {needed} "
                f"exceed the {len(by_class[c])} examples of attack class {data.class_names[c]}; "
                f"allowed: a sum of at most {len(by_class[c])}"
            )
        perm = by_class[c][torch.randperm(len(by_class[c]), generator=g)]
        benign, attacker, held = _take(perm, [spec.benign_examples, spec.attacker_examples, spec.validation_examples])
        train_idx[c] = benign
        if i == 0:
            x_t = attacker
            continue
        for chosen, dest in ((attacker, x_b), (held, x_v)):
            images.append(stamp(data.images[chosen], params.key))
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
        target=attack_classes[0],
        backdoor=attack_classes[1:],
        attack_owner=owners,
        attacker_target_idx=x_t,
        attack_train_idx=torch.cat(x_b),
        attack_val_idx=torch.cat(x_v),
    )
