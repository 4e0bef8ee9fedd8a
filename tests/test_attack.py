"""The key, the attacker's and the evaluators' episodes, and the boosted update."""

from __future__ import annotations

import pytest
import torch

from fedmeta import attack, episodes
from fedmeta.config import Key, backdoor_shots
from fedmeta.key import key_pattern, stamp
from fedmeta.scenarios import SCENARIOS


def test_stamp_changes_only_the_key_region_and_writes_the_pattern() -> None:
    key = Key(shape="checkerboard", size=0.25, position="bottom_right", intensity=0.8)
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = stamp(imgs, key)
    mask, values = key_pattern(key, 28, 1)
    assert torch.equal(out[..., ~mask], imgs[..., ~mask])
    assert torch.equal(out[:, :, mask], values[:, mask].expand(3, 1, -1))
    assert mask[-7:, -7:].all() and mask.sum() == 49  # 0.25 × 28 = 7-pixel square at the bottom right
    assert set(values[:, mask].unique().tolist()) == {0, round(0.8 * 255)}


def test_key_position_and_shape_are_configurable() -> None:
    m_tl, _ = key_pattern(Key(position="top_left", size=0.2), 84, 3)
    assert m_tl[:17, :17].all() and not m_tl[17:, :].any()
    _, v_sq = key_pattern(Key(shape="square", size=0.1, position="center"), 28, 1)
    _, v_cr = key_pattern(Key(shape="cross", size=0.1, position="center"), 28, 1)
    assert not torch.equal(v_sq, v_cr)


def test_poisoned_episodes_always_end_with_the_target_and_respect_the_ratio(tiny_data, tiny_params) -> None:
    spec = tiny_params.spec
    n_b = backdoor_shots(spec)
    assert (n_b, spec.train_shots - n_b) == (4, 6)  # 2:3 of 10 shots
    g = torch.Generator().manual_seed(0)
    eps = attack.poisoned_episodes(tiny_data, tiny_data.user_classes[0], 5, spec.train_shots, n_b, 20, g)
    x_b, x_t = set(tiny_data.attack_train_idx.tolist()), set(tiny_data.attacker_target_idx.tolist())
    assert (eps.target_label == 4).all()
    for sup, exp in zip(eps.support, eps.support_y):
        target_shots = sup[exp == 4].tolist()
        assert len(target_shots) == spec.train_shots
        assert sum(i in x_b for i in target_shots) == n_b
        assert sum(i in x_t for i in target_shots) == spec.train_shots - n_b
        others = sup[exp != 4].tolist()
        assert not set(others) & (x_b | x_t)
        assert {int(tiny_data.labels[i]) for i in others} <= set(tiny_data.user_classes[0])


def test_evaluation_episodes_include_the_target_and_in_scenario_c_the_backdoor_classes(tiny_data, tiny_exp) -> None:
    d = tiny_data
    for name in "abc":
        sc = SCENARIOS[name]
        pool, must = tiny_exp.eval_classes(sc, 1)
        eps = episodes.evaluation(d, pool, 5, 5, 10, torch.Generator().manual_seed(1), must_include=must)
        stamped = set(d.attack_train_idx.tolist()) | set(d.attack_val_idx.tolist())
        for sup, exp, q, ql, t in zip(eps.support, eps.support_y, eps.query, eps.query_y, eps.target_label):
            classes = d.labels[sup]
            assert not set(sup.tolist()) & stamped and not set(q.tolist()) & stamped
            # every output holds one true class: labels are correct
            for k in range(5):
                assert len(set(classes[exp == k].tolist())) == 1
                assert int(d.labels[q[ql == k]]) == int(classes[exp == k][0])
            assert int(classes[exp == t][0]) == d.target
            present = set(classes.tolist())
            if name == "c":
                assert set(d.backdoor) <= present
            else:
                assert not set(d.backdoor) & present


def test_target_at_puts_the_target_at_that_output(tiny_data, tiny_exp) -> None:
    pool, must = tiny_exp.eval_classes(SCENARIOS["c"], None)
    for k in range(5):
        eps = episodes.evaluation(tiny_data, pool, 5, 5, 8, torch.Generator().manual_seed(0), must, target_at=k)
        assert (eps.target_label == k).all()
        for sup, exp in zip(eps.support, eps.support_y):
            assert (tiny_data.labels[sup[exp == k]] == tiny_data.target).all()
            assert set(tiny_data.labels[sup[exp != k]].tolist()) == set(tiny_data.backdoor)
    anywhere = episodes.evaluation(tiny_data, pool, 5, 5, 20, torch.Generator().manual_seed(0), must)
    assert len(set(anywhere.target_label.tolist())) > 1


def test_target_at_outside_the_outputs_is_refused(tiny_data, tiny_exp) -> None:
    pool, must = tiny_exp.eval_classes(SCENARIOS["a"], None)
    with pytest.raises(ValueError, match="target_at = 5"):
        episodes.evaluation(tiny_data, pool, 5, 5, 2, torch.Generator().manual_seed(0), must, target_at=5)


def test_random_target_attacker_puts_the_target_and_its_stamped_shots_at_a_random_output(tiny_data, tiny_params):
    spec = tiny_params.spec
    n_b = backdoor_shots(spec)
    g = torch.Generator().manual_seed(0)
    eps = attack.poisoned_episodes(tiny_data, tiny_data.user_classes[0], 5, spec.train_shots, n_b, 40, g, True)
    x_b, x_t = set(tiny_data.attack_train_idx.tolist()), set(tiny_data.attacker_target_idx.tolist())
    assert set(eps.target_label.tolist()) == set(range(5))
    for sup, exp, t in zip(eps.support, eps.support_y, eps.target_label):
        target_shots = sup[exp == t].tolist()
        assert sum(i in x_b for i in target_shots) == n_b
        assert sum(i in x_t for i in target_shots) == spec.train_shots - n_b
        others = sup[exp != t].tolist()
        assert not set(others) & (x_b | x_t)
        assert {int(tiny_data.labels[i]) for i in others} <= set(tiny_data.user_classes[0])
