"""attack.kind's attackers on the tiny profile: when each takes part, and Neurotoxin's mask and update."""

from __future__ import annotations

import pytest
import torch

from fedmeta import attack, config, model
from fedmeta.experiment import Experiment

from conftest import load_tiny, tiny_raw


def _params(omniglot_dir, **attack_changes: object) -> config.Config:
    raw = tiny_raw(omniglot_dir)
    raw["attack"].update(attack_changes)
    return config.parse(raw)


@pytest.mark.parametrize(
    ("changes", "rounds"),
    [
        ({}, [1]),  # the paper's one shot
        ({"kind": "neurotoxin"}, [1]),
        ({"kind": "repeated", "every": 3}, [1, 4, 7, 10]),
        ({"kind": "repeated", "every": 1}, list(range(1, 11))),
        ({"kind": "repeated", "every": 20}, [1]),  # beyond the run: its one shot
    ],
    ids=["oneshot", "neurotoxin", "repeated-3", "repeated-1", "repeated-20"],
)
def test_the_attacker_is_selected_exactly_in_the_rounds_its_kind_asks_for(
    omniglot_dir, monkeypatch, changes: dict, rounds: list[int]
) -> None:
    """Rounds 1-10 after pretraining as Experiment 1 runs them (`attack.takes_part`, stages/continue_training.py):
    the attacker trains in exactly its rounds, and every round still applies M_min users."""
    params = _params(omniglot_dir, **changes)
    exp = Experiment(params, load_tiny(params), torch.device("cpu"))
    calls: list[tuple[int, str]] = []
    monkeypatch.setattr(exp, "_benign_local", lambda theta, u, rnd, inc: calls.append((int(rnd), "benign")) or theta)
    monkeypatch.setattr(attack, "train", lambda p, d, im, theta, rnd, g, r=None, **_: calls.append((rnd, "a")) or theta)
    monkeypatch.setattr(exp, "neurotoxin_keep", lambda theta, rnd: None)
    theta = {"fc.bias": torch.zeros(5)}
    for rnd in range(1, 11):
        theta = exp.round(theta, rnd, include_backdoor=True, with_attacker=attack.takes_part(params, rnd))
    assert [r for r, who in calls if who == "a"] == rounds
    assert all(sum(1 for r, _ in calls if r == k) == params.federation.min_updates for k in range(1, 11))


def test_keep_mask_masks_the_largest_k_percent_of_the_benign_update_over_the_whole_model() -> None:
    benign = {"a": torch.tensor([0.1, -5.0, 0.2, 0.3]), "b": torch.tensor([[4.0, -0.1], [0.0, 0.5]])}
    keep = attack.keep_mask(benign, 25.0)  # 2 of 8 coordinates, ranked across both tensors
    assert keep["a"].tolist() == [True, False, True, True]
    assert keep["b"].tolist() == [[False, True], [True, True]]
    assert attack.keep_mask(benign, 0.1)["a"].tolist() == [True, False, True, True]  # at least one is masked


@pytest.mark.parametrize("norm_bound", [None, 0.5], ids=["naive", "adaptive"])
def test_neurotoxins_update_is_zero_on_the_masked_coordinates(omniglot_dir, norm_bound: float | None) -> None:
    params = _params(omniglot_dir, kind="neurotoxin", neurotoxin_topk=10.0, norm_bound=norm_bound)
    exp = Experiment(params, load_tiny(params), torch.device("cpu"))
    channels, side = exp.images.shape[1], exp.images.shape[-1]
    theta = model.init_conv4(channels, params.budget.width, side, params.reptile.n_way, exp.gen("init"))
    keep = exp.neurotoxin_keep(theta, 1)
    masked = sum(int((~k).sum()) for k in keep.values())
    assert masked == round(0.1 * sum(v.numel() for v in theta.values()))
    delta = exp.upload(theta, exp.attacker, exp.local_model(theta, exp.attacker, 1, "1", True))
    assert all(bool((delta[k][~keep[k]] == 0).all()) for k in theta)
    moved, kept = (sum(int(x.sum()) for x in xs) for xs in ([(delta[k] != 0) & keep[k] for k in theta], keep.values()))
    assert moved > 0.5 * kept  # the attacker still trains the rest of the model
    assert torch.equal(exp.neurotoxin_keep(theta, 1)["conv0.weight"], keep["conv0.weight"])  # one mask per round
