"""Secure aggregation: the masks cancel in the sum, and one masked upload says nothing about its update."""

from __future__ import annotations

import torch

from fedmeta import attack, federation, secure, seeding
from fedmeta.config import Federation
from fedmeta.experiment import Experiment


def updates(n: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.randn(50, 40, generator=g), "b": 3.0 * torch.randn(7, generator=g)} for _ in range(n)]


def pairs(*path: object):
    return lambda i, j: seeding.generator(0, "secagg", *path, i, j)


def test_masked_sum_equals_the_true_weighted_sum() -> None:
    ups, alphas = updates(5, torch.Generator().manual_seed(0)), [0.1, 0.2, 0.3, 0.15, 0.25]
    total = secure.unmask_sum(secure.mask(ups, alphas, pairs(1)), ups[0])
    for k in ups[0]:
        assert torch.allclose(total[k], sum(a * u[k] for a, u in zip(alphas, ups)), atol=1e-6, rtol=0)
        assert total[k].dtype == torch.float32


def test_one_masked_upload_is_uncorrelated_with_its_update() -> None:
    ups = updates(3, torch.Generator().manual_seed(1))
    big = [{"w": 100.0 * u["w"]} for u in ups]  # large updates: any leak would show
    for i, upload in enumerate(secure.mask(big, [1 / 3] * 3, pairs(2))):
        seen, true = secure.decode(upload["w"]).flatten(), big[i]["w"].flatten().double()
        assert abs(torch.corrcoef(torch.stack([seen, true]))[0, 1].item()) < 0.1
        assert seen.abs().mean() > 1e6 * true.abs().mean()  # spread over the whole ring, not near the update


def test_pair_masks_depend_on_the_round() -> None:
    ups = updates(2, torch.Generator().manual_seed(2))
    a, b = secure.mask(ups, [0.5, 0.5], pairs(1))[0], secure.mask(ups, [0.5, 0.5], pairs(2))[0]
    assert not torch.equal(a["w"], b["w"])


def test_aggregate_under_secure_aggregation_matches_the_plain_rule() -> None:
    ups, alphas = updates(3, torch.Generator().manual_seed(3)), [1 / 3] * 3
    theta = {k: torch.ones_like(v) for k, v in ups[0].items()}
    for agg in ("mean", "norm_clip"):
        plain_rule, secure_rule = (
            Federation(aggregator=agg, norm_clip={"clip_norm": 20.0}),
            Federation(aggregator=agg, secure_aggregation=True, norm_clip={"clip_norm": 20.0}),
        )
        sent = secure.mask([federation.client_side(u, secure_rule) for u in ups], alphas, pairs(3))
        plain = federation.aggregate(theta, ups, alphas, plain_rule)
        masked = federation.aggregate(theta, sent, alphas, secure_rule)
        for k in theta:
            assert torch.allclose(plain[k], masked[k], atol=1e-5, rtol=0)


def test_a_secure_round_gives_the_plain_rounds_model_and_the_attacker_skips_client_clipping(
    tiny_exp: Experiment, monkeypatch
) -> None:
    """The masked round applies the same Σ α_i δ_i; under norm_clip honest clients clip, the attacker does not."""
    theta = {"w": torch.zeros(4)}
    local = {u: {"w": torch.full((4,), float(u + 1))} for u in range(tiny_exp.params.federation.users)}
    monkeypatch.setattr(tiny_exp, "_benign_local", lambda th, u, rnd, inc: local[u])
    monkeypatch.setattr(attack, "train", lambda p, d, im, th, rnd, g, resume=None, **_: local[tiny_exp.attacker])
    plain = tiny_exp.round(theta, 1, True, with_attacker=True)
    fed = tiny_exp.params.federation
    secure = fed.model_copy(update={"secure_aggregation": True})
    monkeypatch.setattr(tiny_exp, "params", tiny_exp.params.model_copy(update={"federation": secure}))
    assert torch.allclose(tiny_exp.round(theta, 1, True, with_attacker=True)["w"], plain["w"], atol=1e-6)
    clip = fed.model_copy(
        update={
            "secure_aggregation": True,
            "aggregator": "norm_clip",
            "norm_clip": fed.norm_clip.model_copy(update={"clip_norm": 1.0}),
        }
    )
    monkeypatch.setattr(tiny_exp, "params", tiny_exp.params.model_copy(update={"federation": clip}))
    out = tiny_exp.round(theta, 1, True, with_attacker=True)["w"]
    boost, n = tiny_exp.params.attack.boost, fed.min_updates
    # each honest client's (u + 1, …, u + 1) clipped to norm 1 is (0.5, 0.5, 0.5, 0.5);
    # the attacker's boosted update stays whole
    expected = boost * (tiny_exp.attacker + 1) / n + (n - 1) * 0.5 / n
    assert torch.allclose(out, torch.full((4,), expected), atol=1e-6)
