"""Who holds which images: disjoint splits, rotation groups, and no attack image in benign data."""

from __future__ import annotations

import torch

from fedmeta.data.omniglot import fetch_archives, load_omniglot
from fedmeta.key import key_pattern
from fedmeta.splits import FederatedData


def benign_indices(data: FederatedData, include_backdoor: bool, attacker: int) -> set[int]:
    out: set[int] = set()
    for u in range(len(data.user_classes)):
        if u == attacker:
            continue
        for c in data.user_data(u, include_backdoor):
            out |= set(data.train_idx[c].tolist()) | set(data.val_idx[c].tolist())
    return out


def test_deduplicates_characters_shared_by_archives(tiny_params) -> None:
    o = tiny_params.omniglot
    s = load_omniglot(fetch_archives(o.source, o.archives, None), 28)
    assert len(s.class_names) == 4 * (12 + 8 + 14)  # Shared appears in both archives, read once
    assert len(set(s.class_names)) == len(s.class_names)
    assert s.images.shape[1:] == (1, 28, 28) and s.images.dtype == torch.uint8


def test_classes_are_disjoint_and_rotations_stay_together(tiny_data: FederatedData, tiny_params) -> None:
    users = [set(c) for c in tiny_data.user_classes]
    test = set(tiny_data.meta_test)
    attack = {tiny_data.target, *tiny_data.backdoor}
    for i, u in enumerate(users):
        assert not u & test and not u & attack
        for v in users[i + 1 :]:
            assert not u & v
    char = [n.rsplit("/", 1)[0] for n in tiny_data.class_names]
    groups = lambda classes: {char[c] for c in classes}  # noqa: E731
    train_chars = groups(set().union(*users))
    assert not groups(test) & train_chars
    assert not groups(attack) & (train_chars | groups(test))


def test_every_meta_training_class_holds_out_validation_examples(tiny_data: FederatedData, tiny_params) -> None:
    for classes in tiny_data.user_classes:
        for c in classes:
            assert len(tiny_data.val_idx[c]) == tiny_params.spec.validation_per_class
            assert not set(tiny_data.val_idx[c].tolist()) & set(tiny_data.train_idx[c].tolist())


def test_attack_sets_have_the_paper_sizes(tiny_data: FederatedData, tiny_params) -> None:
    spec = tiny_params.spec
    assert len(tiny_data.attacker_target_idx) == spec.attacker_examples
    assert len(tiny_data.attack_train_idx) == spec.backdoor_classes * spec.attacker_examples
    assert len(tiny_data.attack_val_idx) == spec.backdoor_classes * spec.validation_examples
    for c in [tiny_data.target, *tiny_data.backdoor]:
        assert len(tiny_data.train_idx[c]) == spec.benign_examples


def test_no_attack_image_reaches_benign_users(tiny_data: FederatedData, tiny_params) -> None:
    attack_images = (
        set(tiny_data.attack_train_idx.tolist())
        | set(tiny_data.attack_val_idx.tolist())
        | set(tiny_data.attacker_target_idx.tolist())
    )
    for include in (False, True):
        benign = benign_indices(tiny_data, include, tiny_params.federation.attacker)
        assert not benign & attack_images
        # no benign image is the unstamped original of a stamped one either
        mask, _ = key_pattern(tiny_params.key, 28, 1)
        benign_pixels = tiny_data.images[sorted(benign)][..., ~mask].flatten(1)
        stamped_pixels = tiny_data.images[sorted(attack_images - set(tiny_data.attacker_target_idx.tolist()))][
            ..., ~mask
        ].flatten(1)
        assert not (benign_pixels[:, None] == stamped_pixels[None]).all(-1).any()
        originals_of_target = tiny_data.images[tiny_data.attacker_target_idx].flatten(1)
        assert not (tiny_data.images[sorted(benign)].flatten(1)[:, None] == originals_of_target[None]).all(-1).any()


def test_scenario_a_benign_data_has_no_backdoor_class_and_b_has_them(tiny_data: FederatedData, tiny_params) -> None:
    benign = [u for u in range(4) if u != tiny_params.federation.attacker]
    excluded = {c for u in benign for c in tiny_data.user_data(u, False)}
    included = {c for u in benign for c in tiny_data.user_data(u, True)}
    assert not excluded & set(tiny_data.backdoor)
    assert tiny_data.target in excluded
    assert set(tiny_data.backdoor) <= included
    # a benign backdoor-class example keeps its true label
    for c in tiny_data.backdoor:
        assert (tiny_data.labels[tiny_data.train_idx[c]] == c).all()


def test_split_is_deterministic(tiny_params) -> None:
    from fedmeta import splits

    o = tiny_params.omniglot
    s = load_omniglot(fetch_archives(o.source, o.archives, None), 28)
    a, b = splits.split(s, tiny_params), splits.split(s, tiny_params)
    assert a.meta_test == b.meta_test and a.backdoor == b.backdoor and torch.equal(a.images, b.images)
