"""Experiment 4's server rules on small hand-made updates with known answers, and the refused combinations."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from fedmeta import attack, config, federation
from fedmeta.config import Federation
from fedmeta.errors import FedmetaError

from conftest import REPO, tiny_raw

THETA = {"w": torch.zeros(3), "b": torch.zeros(1)}


def deltas(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(r[:3]), "b": torch.tensor(r[3:])} for r in rows]


def rule(aggregator: str, **changes: object) -> Federation:
    return Federation(aggregator=aggregator, **changes)


def test_mean_is_the_papers_weighted_sum_bit_for_bit() -> None:
    ds, alphas = deltas([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [7.0, 8.0, 9.0, 1.0]), [0.2, 0.3, 0.5]
    theta = {"w": torch.tensor([0.3, -0.7, 1.1]), "b": torch.tensor([0.9])}
    out = federation.aggregate(theta, ds, alphas, rule("mean"), torch.Generator())
    for k in theta:
        assert torch.equal(out[k], theta[k] + sum(a * d[k] for a, d in zip(alphas, ds)))


def test_median_of_one_two_hundred_is_two() -> None:
    out = federation.aggregate(
        THETA,
        deltas([1.0, -5.0, 0.0, 1.0], [2.0, 0.0, 0.0, 100.0], [100.0, 1.0, 0.0, 2.0]),
        [1 / 3] * 3,
        rule("median"),
    )
    assert out["w"].tolist() == [2.0, 0.0, 0.0] and out["b"].tolist() == [2.0]


def test_trimmed_mean_cuts_the_extremes_of_each_coordinate() -> None:
    ds = deltas(*[[float(v), 0.0, 0.0, -float(v)] for v in (1, 2, 3, 4, 1000)])  # β = 0.2 of 5 cuts one at each end
    out = federation.aggregate(THETA, ds, [0.2] * 5, rule("trimmed_mean", min_updates=5, trimmed_mean={"beta": 0.2}))
    assert out["w"][0].item() == pytest.approx(3.0) and out["b"].item() == pytest.approx(-3.0)


def test_krum_drops_the_outlier() -> None:
    benign = [[1.0, 1.0, 1.0, 1.0], [1.1, 0.9, 1.0, 1.0], [0.9, 1.1, 1.0, 1.0], [1.0, 1.0, 1.1, 0.9]]
    ds = deltas(*benign, [30.0, -30.0, 30.0, 30.0])
    krum = federation.aggregate(THETA, ds, [0.2] * 5, rule("multi_krum", min_updates=5, multi_krum={"f": 1, "m": 1}))
    assert any(torch.equal(krum["w"], torch.tensor(b[:3])) for b in benign)
    multi = federation.aggregate(THETA, ds, [0.2] * 5, rule("multi_krum", min_updates=5, multi_krum={"f": 1, "m": 4}))
    assert torch.allclose(multi["w"], torch.tensor(benign)[:, :3].mean(0))


def test_norm_clip_bounds_every_update_then_averages() -> None:
    ds = deltas([3.0, 4.0, 0.0, 0.0], [0.3, 0.4, 0.0, 0.0])  # norms 5 and 0.5
    clipped = [federation.clip(d, 1.0) for d in ds]
    assert federation.norm(clipped[0]) == pytest.approx(1.0) and clipped[1] is ds[1]
    out = federation.aggregate(THETA, ds, [0.5, 0.5], rule("norm_clip", norm_clip={"clip_norm": 1.0}))
    assert torch.allclose(out["w"], torch.tensor([0.45, 0.6, 0.0]))


def test_norm_clip_noise_is_drawn_from_the_generator() -> None:
    ds, r = deltas([3.0, 4.0, 0.0, 0.0]), rule("norm_clip", norm_clip={"clip_norm": 1.0, "noise": 0.5})
    a, b = (federation.aggregate(THETA, ds, [1.0], r, torch.Generator().manual_seed(s)) for s in (1, 1))
    c = federation.aggregate(THETA, ds, [1.0], r, torch.Generator().manual_seed(2))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    with pytest.raises(ValueError, match="generator"):
        federation.aggregate(THETA, ds, [1.0], r)


def test_constrain_and_scale_lands_just_under_the_bound() -> None:
    for d in deltas([30.0, 40.0, 0.0, 0.0], [0.03, 0.04, 0.0, 0.0]):
        assert federation.norm(attack.constrain(d, 2.0)) == pytest.approx(attack.NORM_MARGIN * 2.0)


def _look_alikes(n: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    base = torch.randn(400, generator=g)
    return [{"w": base + 0.3 * torch.randn(400, generator=g)} for _ in range(n)]


@pytest.mark.parametrize("n_benign", [2, 9])
def test_flame_rejects_a_boosted_outlier_and_keeps_benign_look_alikes(n_benign: int) -> None:
    """The attacker, another direction ten times longer, is always out; of nine look-alikes HDBSCAN keeps a
    majority (its single cluster sheds the points that leave it first, a price FLAME pays), of two, both."""
    g = torch.Generator().manual_seed(0)
    benign = _look_alikes(n_benign, g)
    attacker = {"w": 10.0 * torch.randn(400, generator=g)}
    ds, n = [*benign, attacker], n_benign + 1
    admitted = federation.flame_admitted(ds)
    assert n not in admitted and len(admitted) > n // 2 and (n_benign > 2 or admitted == [0, 1])
    out = federation.aggregate(
        {"w": torch.zeros(400)}, ds, [1 / n] * n, rule("flame", min_updates=n, flame={"noise": 0.0})
    )
    s = float(torch.tensor([federation.norm(d) for d in ds]).double().median()) if n % 2 else None
    if s is not None:  # odd n: S is one of the norms, as numpy's median takes it
        expected = torch.stack([federation.clip(ds[i], s)["w"] for i in admitted]).mean(0)
        assert torch.allclose(out["w"], expected, atol=1e-6)
    assert torch.nn.functional.cosine_similarity(out["w"], attacker["w"], dim=0).abs() < 0.2


def test_flame_noise_scales_with_the_median_norm() -> None:
    ds = _look_alikes(3, torch.Generator().manual_seed(1))
    quiet = federation.aggregate({"w": torch.zeros(400)}, ds, [1 / 3] * 3, rule("flame", flame={"noise": 0.0}))
    noisy = federation.aggregate(
        {"w": torch.zeros(400)}, ds, [1 / 3] * 3, rule("flame", flame={"noise": 0.01}), torch.Generator().manual_seed(0)
    )
    s = sorted(federation.norm(d) for d in ds)[1]
    assert (noisy["w"] - quiet["w"]).std().item() == pytest.approx(0.01 * s, rel=0.15)


def test_experiment4_runs_every_listed_rule_naive_and_nobody_attacking_by_default() -> None:
    from stages import exp4

    aggregators = list(config.load(REPO / "params.yaml").experiment4.aggregators)
    assert tuple(aggregators) == config.AGGREGATORS == get_args(config.Aggregator)
    names = [r.name for r in exp4.runs("exclude", "m4", aggregators)]
    assert names == [
        *(f"naive-{a}" for a in aggregators),
        "adaptive-norm_clip",
        *(f"benign-{a}" for a in aggregators),
        "naive-mean-secure",
        "naive-norm_clip-secure",
    ]
    assert [r.name for r in exp4.runs("include", "m20", aggregators)] == [
        *(f"naive-{a}" for a in aggregators),
        "adaptive-norm_clip",
    ]


def _federation(**changes: object) -> dict:
    raw = tiny_raw()
    raw["federation"].update(changes)
    return raw


@pytest.mark.parametrize(
    ("changes", "culprit"),
    [
        (
            {"aggregator": "median", "secure_aggregation": True},
            "federation.aggregator: 'median' needs each user's update, but federation.secure_aggregation: true",
        ),
        (
            {"aggregator": "flame", "secure_aggregation": True},
            "federation.aggregator: 'flame' needs each user's update",
        ),
        ({"aggregator": "multi_krum", "secure_aggregation": True}, "allowed with secure aggregation: mean, norm_clip"),
        (
            {"aggregator": "trimmed_mean", "trimmed_mean": {"beta": 0.2}},
            "federation.trimmed_mean.beta: 0.2 of federation.min_updates = 3 updates trims none",
        ),
        (
            {"aggregator": "multi_krum", "multi_krum": {"f": 1, "m": 1}},
            "federation.multi_krum.f: 1 needs federation.min_updates > 2f + 2 = 4, but it is 3; allowed: f <= 0",
        ),
        (
            {"aggregator": "multi_krum", "multi_krum": {"f": 0, "m": 4}},
            "federation.multi_krum.m: 4 exceeds federation.min_updates - f = 3",
        ),
        (
            {"aggregator": "median", "per_round": 2, "min_updates": 2},
            "federation.aggregator: 'median' needs at least 3 updates a round",
        ),
        ({"aggregator": "krum"}, "federation.aggregator: Input should be"),
    ],
    ids=["secure-median", "secure-flame", "secure-krum", "trims-none", "krum-f", "krum-m", "too-few", "unknown"],
)
def test_refused_aggregation(changes: dict, culprit: str) -> None:
    with pytest.raises(FedmetaError) as err:
        config.parse(_federation(**changes))
    assert str(err.value).startswith("params.yaml: ") and culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("aggregator", ["mean", "norm_clip"])
def test_secure_aggregation_allows_rules_that_need_only_the_sum(aggregator: str) -> None:
    assert config.parse(_federation(aggregator=aggregator, secure_aggregation=True)).federation.secure_aggregation


def test_experiment4_federations_are_checked_with_every_rule() -> None:
    raw = tiny_raw()
    raw["experiment4"]["federations"]["m20"]["federation"]["multi_krum"] = {"f": 4, "m": 1}
    with pytest.raises(
        FedmetaError,
        match=r"experiment4\.federations\.m20 with aggregator multi_krum: federation\.multi_krum\.f: 4 needs"
        r".*; this blocks Experiment 4's stage exp4 include m20 \(experiment4/dvc\.yaml\)$",
    ):
        config.check_experiment4(config.parse(raw), "m20", "exp4 include m20")
    config.check_experiment4(config.parse(raw), "m4", "exp4 include m4")  # only the federation the stage runs
    p = config.parse(tiny_raw())
    with pytest.raises(
        FedmetaError, match=r"experiment4\.federations: no federation 'm7'; allowed: one of \['m20', 'm4'\]"
    ):
        config.with_overrides(p, "m7")
    m20 = config.with_overrides(p, "m20", attack={"norm_bound": 2.0}, aggregator="median")
    assert (
        m20.federation.users,
        m20.federation.min_updates,
        m20.federation.aggregator,
        m20.attack.boost,
        m20.attack.norm_bound,
    ) == (20, 5, "median", 5.0, 2.0)


def test_experiment4_runs_a_subset_of_rules_but_always_the_baseline() -> None:
    raw = tiny_raw()
    raw["experiment4"]["aggregators"] = ["median", "flame"]
    with pytest.raises(FedmetaError, match=r"experiment4\.aggregators: \['median', 'flame'\] lacks mean, the baseline"):
        config.check_experiment4(config.parse(raw), "m4", "exp4 exclude m4")
    raw["experiment4"]["aggregators"] = ["mean", "median"]
    assert config.parse(raw).experiment4.aggregators == ["mean", "median"]
