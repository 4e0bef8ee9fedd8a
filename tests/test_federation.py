"""Server aggregation, boosting, and who is selected when."""

from __future__ import annotations

import torch

from fedmeta import attack, federation
from fedmeta.experiment import Experiment


def test_aggregate_applies_weighted_updates() -> None:
    theta = {"w": torch.tensor([1.0, 1.0])}
    deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}]
    out = federation.aggregate(theta, deltas, [0.25, 0.75])
    assert torch.allclose(out["w"], torch.tensor([1.25, 3.25]))


def test_boosted_update_is_lambda_times_difference(tiny_params) -> None:
    local, theta = {"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([0.5, 0.5])}
    p = tiny_params.model_copy(update={"attack": tiny_params.attack.model_copy(update={"boost": 3.0})})
    assert torch.allclose(attack.boosted_update(local, theta, p)["w"], 3.0 * (local["w"] - theta["w"]))
    assert torch.allclose(federation.update(local, theta)["w"], local["w"] - theta["w"])


def test_boost_equal_to_min_updates_replaces_the_model_with_uniform_weights() -> None:
    """λ = M_min with α = 1/M_min: the attacker's local model replaces θ_G up to the benign updates."""
    theta, attacker = {"w": torch.zeros(3)}, {"w": torch.tensor([1.0, 2.0, 3.0])}
    deltas = [{"w": 3.0 * (attacker["w"] - theta["w"])}, {"w": torch.zeros(3)}, {"w": torch.zeros(3)}]
    out = federation.aggregate(theta, deltas, federation.weights([10, 20, 30], "uniform"))
    assert torch.allclose(out["w"], attacker["w"])


def test_weights_uniform_and_by_size() -> None:
    assert federation.weights([1, 1, 2], "uniform") == [1 / 3] * 3
    assert federation.weights([1, 1, 2], "size") == [0.25, 0.25, 0.5]


def test_select_picks_min_updates_distinct_benign_users(tiny_params) -> None:
    fed = tiny_params.federation
    for seed in range(20):
        chosen = federation.select(tiny_params.model_copy(update={"seed": seed}), "1", False).applied
        assert len(chosen) == len(set(chosen)) == fed.min_updates and fed.attacker not in chosen
        attacked = federation.select(tiny_params.model_copy(update={"seed": seed}), "1", True).applied
        assert len(set(attacked)) == fed.min_updates and attacked[-1] == fed.attacker


def test_attacker_is_selected_only_in_the_attack_round(tiny_exp: Experiment, monkeypatch) -> None:
    calls: list[tuple[int, str]] = []
    monkeypatch.setattr(
        tiny_exp, "_benign_local", lambda theta, u, rnd, inc: calls.append((int(rnd), f"benign{u}")) or theta
    )
    monkeypatch.setattr(
        attack, "train", lambda p, d, im, theta, rnd, g, resume=None, **_: calls.append((rnd, "attacker")) or theta
    )
    theta = {"fc.bias": torch.zeros(5)}
    for rnd in range(6):
        theta = tiny_exp.round(theta, rnd, include_backdoor=True, with_attacker=rnd == 1)
    assert [c for c in calls if c[1] == "attacker"] == [(1, "attacker")]
    assert sum(1 for r, _ in calls if r == 1) == tiny_exp.params.federation.min_updates
    assert all(sum(1 for r, _ in calls if r == k) == tiny_exp.params.federation.min_updates for k in range(6))
