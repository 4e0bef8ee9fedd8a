"""Filtering rules' screenings and detection rates, on hand-built rounds with a known outlier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta import detection, federation
from fedmeta.config import Federation
from fedmeta.federation import Screening

USERS = [2, 3, 1, 0]  # applied order; user 0 is the attacker, its update the last


def _round(g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    base = torch.randn(400, generator=g)
    benign = [{"w": base + 0.3 * torch.randn(400, generator=g)} for _ in range(3)]
    return [*benign, {"w": 10.0 * torch.randn(400, generator=g)}]


@pytest.mark.parametrize(
    "rule",
    [
        Federation(aggregator="multi_krum", min_updates=4, per_round=3, multi_krum={"f": 0, "m": 3}),
        Federation(aggregator="flame", min_updates=4, per_round=3, flame={"noise": 0.0}),
    ],
    ids=["multi_krum", "flame"],
)
def test_a_filtering_rule_rejects_the_outlier_and_its_rates_say_so(rule: Federation) -> None:
    deltas = _round(torch.Generator().manual_seed(0))
    _, kept = federation.aggregate_kept({"w": torch.zeros(400)}, deltas, [0.25] * 4, rule)
    assert kept is not None and sorted(kept) == [0, 1, 2]
    row = detection.round_row(1, Screening(USERS, [USERS[i] for i in kept]), attacker=0)
    assert row["rejected"] == [1] and sorted(row["kept"]) == [2, 3, 4]  # users numbered from 1
    assert (row["tpr"], row["fpr"], row["precision"]) == (1.0, 0.0, 1.0)


def test_rates_count_a_rejected_benign_user_and_false_alarms_in_benign_rounds() -> None:
    krum = Screening(USERS, [2])  # Krum keeping one: the attacker and two benign users out
    row = detection.round_row(1, krum, attacker=0)
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (1, 2, 0, 1)
    assert (row["tpr"], row["fpr"], row["precision"]) == (
        1.0,
        pytest.approx(2 / 3, abs=1e-6),
        pytest.approx(1 / 3, abs=1e-6),
    )
    missed = detection.round_row(3, Screening(USERS, USERS), attacker=0)
    assert (missed["tpr"], missed["fpr"], missed["precision"]) == (0.0, 0.0, 0.0)
    benign = detection.round_row(2, Screening([2, 3, 1], [2, 3]), attacker=0)
    assert not benign["attacked"] and benign["false_alarm"] == pytest.approx(1 / 3, abs=1e-6) and "tpr" not in benign
    summary = detection.summary([row, benign, missed])
    assert summary["attack_rounds"] == {
        "rounds": 2,
        "tpr": 0.5,
        "fpr": pytest.approx(2 / 6, abs=1e-6),
        "precision": pytest.approx(1 / 3, abs=1e-6),
    }
    assert summary["benign_rounds"] == {"rounds": 1, "false_alarm": pytest.approx(1 / 3, abs=1e-6)}


@pytest.mark.parametrize(("f", "m"), [(0, 1), (0, 3), (1, 2)])
def test_krum_averages_what_flowers_krum_averages_bit_for_bit(f: int, m: int) -> None:
    from flwr.server.strategy.aggregate import aggregate_krum

    deltas = [*_round(torch.Generator().manual_seed(1)), {"w": torch.randn(400, generator=torch.Generator())}]
    alphas = [0.2] * 5
    rule = Federation(aggregator="multi_krum", min_updates=5, per_round=5, users=6, multi_krum={"f": f, "m": m})
    ours = federation.aggregate({"w": torch.zeros(400)}, deltas, alphas, rule)["w"]
    flower = aggregate_krum([([d["w"].numpy()], a) for d, a in zip(deltas, alphas)], f, m)[0]
    assert torch.equal(ours, torch.zeros(400) + torch.from_numpy(np.asarray(flower)))


def test_the_server_round_records_whom_the_rule_kept(tiny_exp, monkeypatch) -> None:
    """Experiment.round's screening on the local engine: the attacker's far-off update is the one multi_krum drops."""
    rule = tiny_exp.params.federation.model_copy(update={"aggregator": "multi_krum"})
    tiny_exp.params = tiny_exp.params.model_copy(update={"federation": rule})
    far = {"fc.bias": torch.full((5,), 50.0)}
    monkeypatch.setattr(
        tiny_exp, "local_model", lambda theta, u, *a: far if u == 0 else {"fc.bias": torch.rand(5) * 0.01}
    )
    monkeypatch.setattr(tiny_exp, "upload", lambda theta, u, local: local)
    tiny_exp.round({"fc.bias": torch.zeros(5)}, 1, True, with_attacker=True)
    tiny_exp.round({"fc.bias": torch.zeros(5)}, 2, True)
    attacked, benign = tiny_exp.screenings[1], tiny_exp.screenings[2]
    assert 0 in attacked.rejected and attacked.kept != [] and 0 not in attacked.kept
    assert 0 not in benign.users and len(benign.kept) == rule.multi_krum.m
