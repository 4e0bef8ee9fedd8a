"""Reptile's inner and outer steps against closed forms and against the naive per-episode loop."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fedmeta import fast, model, portable, reptile
from fedmeta.adam import AdamConfig, AdamState, adam_update
from fedmeta.errors import FedmetaError
from fedmeta.fast import stacked

IMPLEMENTATIONS = ("lanes", "stacked", "vmap")


def tiny_params(dtype: torch.dtype = torch.float64) -> model.Theta:
    p = model.init_conv4(1, 4, 28, 3, torch.Generator().manual_seed(0))
    return {k: v.to(dtype) for k, v in p.items()}


def test_outer_step_is_the_convex_combination() -> None:
    theta = {"w": torch.tensor([1.0, -2.0])}
    adapted = {"w": torch.tensor([[3.0, 0.0], [5.0, 2.0]])}
    out = reptile.outer_step(theta, adapted, 0.25)
    # (1 - ε)θ + (ε/B) Σ θ_j with ε = 0.25, B = 2
    assert torch.allclose(out["w"], 0.75 * theta["w"] + 0.25 * (adapted["w"][0] + adapted["w"][1]) / 2)


def test_adam_update_matches_torch_adam_with_beta1_zero() -> None:
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    ref = p0.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.0, 0.999))
    cfg = AdamConfig(lr=0.01)
    params, state = {"p": p0.clone()}, AdamState.zeros_like({"p": p0})
    for gr in grads:
        ref.grad = gr.clone()
        opt.step()
        params = adam_update(params, {"p": gr}, state, cfg)
    assert torch.allclose(params["p"], ref.detach(), atol=1e-12)


def test_portable_sqrt_is_the_correctly_rounded_root() -> None:
    """Portable mode's root equals IEEE's (numpy's float32 sqrt is the CPU's own instruction, correctly rounded),
    which is one value on every CPU: every 7th float32 of [1, 4) (both exponent parities), zero, the extremes."""
    x = np.concatenate(
        [np.arange(0x3F800000, 0x40800000, 7, dtype=np.uint32).view(np.float32), [0.0, 1e-45, 1.2e-38, 3.4e38]]
    ).astype(np.float32)
    got = portable.sqrt(torch.from_numpy(x), portable=True)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), np.sqrt(x).view(np.uint32))


def test_portable_adam_on_lanes_is_reptiles_portable_adam(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lanes' in-place Adam and `adam_update` take the same portable root, so they stay bit for bit."""
    from fedmeta.fast import conv4

    monkeypatch.setattr(portable, "sqrt", functools.partial(portable.sqrt, portable=True))
    g = torch.Generator().manual_seed(3)
    p0, v0 = torch.randn(64, 9, generator=g), torch.rand(64, 9, generator=g) * 1e-4
    grads = [torch.randn(64, 9, generator=g) for _ in range(3)]
    cfg = AdamConfig(lr=0.003)
    params, state = {"p": p0.clone()}, AdamState.zeros_like({"p": p0})
    state.v["p"] = v0.clone()
    p, v = [p0.clone()], [v0.clone()]
    for step, gr in enumerate(grads, 1):
        params = adam_update(params, {"p": gr}, state, cfg)
        conv4.adam_(p, [gr], [torch.zeros_like(gr)], v, step, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, True)
    assert torch.equal(p[0], params["p"]) and torch.equal(v[0], state.v["p"])


def test_one_inner_step_reptile_equals_closed_form() -> None:
    """With one Adam step (β1 = 0) each episode moves by −η g/(|g| + eps'); Reptile averages those moves."""
    theta = tiny_params()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 1, 0, 2, 1, 0]])
    batches = torch.arange(6).view(1, 1, 6).expand(2, 1, 6)
    cfg = AdamConfig(lr=0.001)
    adapted, _ = reptile.adapt(reptile.expand(theta, 2), x, y, batches, cfg)
    new = reptile.outer_step(theta, adapted, 0.5)
    for k in theta:
        moves = []
        for j in range(2):
            q = {n: v.clone().requires_grad_() for n, v in theta.items()}
            model.loss(q, x[j], y[j]).backward()
            gk = q[k].grad
            denom = (gk * gk * (1 - cfg.beta2)).sqrt() / (1 - cfg.beta2) ** 0.5 + cfg.eps
            moves.append(-cfg.lr * gk / denom)
        expected = theta[k] + 0.5 * (moves[0] + moves[1]) / 2
        assert torch.allclose(new[k], expected, atol=1e-12), k


def naive_episode(
    theta: model.Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, lr: float
) -> model.Theta:
    """The reference loop: a fresh copy, torch.optim.Adam, autograd."""
    q = {k: v.clone().requires_grad_() for k, v in theta.items()}
    opt = torch.optim.Adam(q.values(), lr=lr, betas=(0.0, 0.999))
    for idx in batches:
        opt.zero_grad()
        model.loss(q, x[idx], y[idx]).backward()
        opt.step()
    return {k: v.detach() for k, v in q.items()}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_batched_adapt_equals_per_episode_loop(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    monkeypatch.setenv("FEDMETA_ADAPT", impl)
    theta = tiny_params()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 9, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(3).expand(3, 9).clone()
    batches = torch.stack([torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(5)]) for _ in range(3)])
    adapted, _ = reptile.adapt(
        reptile.expand(theta, 3), x, y, batches, AdamConfig(lr=0.01), backend=fast.backend(x.device)
    )
    for j in range(3):
        ref = naive_episode(theta, x[j], y[j], batches[j], 0.01)
        for k in theta:
            assert torch.allclose(adapted[k][j], ref[k], atol=1e-10), (j, k)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_adapt_in_segments_equals_one_call(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    monkeypatch.setenv("FEDMETA_ADAPT", impl)
    theta = tiny_params()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(2, 6).clone()
    batches = torch.randint(6, (2, 6, 3), generator=gen)
    cfg = AdamConfig()
    backend = fast.backend(x.device)
    whole, _ = reptile.adapt(reptile.expand(theta, 2), x, y, batches, cfg, backend=backend)
    part, state = reptile.adapt(reptile.expand(theta, 2), x, y, batches[:, :2], cfg, backend=backend)
    part, _ = reptile.adapt(part, x, y, batches[:, 2:], cfg, state, backend)
    for k in theta:
        assert torch.equal(whole[k], part[k])


def test_implementation_choice() -> None:
    """Lanes on the CPU and stacked elsewhere for a Conv4 (a meta tensor stands in for a GPU's), vmap for
    any other model; FEDMETA_ADAPT overrides the choice for a Conv4 only."""
    cpu, off_cpu = torch.device("cpu"), torch.device("meta")
    assert fast.implementation(cpu) == "lanes" and fast.implementation(off_cpu) == "stacked"
    assert fast.implementation(cpu, conv4=False) == "vmap"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMETA_ADAPT", "stacked")
        assert fast.implementation(cpu) == "stacked" and fast.implementation(cpu, conv4=False) == "vmap"


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (30, 1), (36, 3)])
def test_stacked_loss_and_gradient_equal_vmap(size: int, channels: int) -> None:
    """The GPU path's one-network form against vmap of the per-episode loss, odd sides (30 → 15 → 7 → 3) included."""
    g = torch.Generator().manual_seed(5)
    theta = model.init_conv4(channels, 6, size, 5, g)
    params = {
        k: v.double() + 0.1 * torch.randn(3, *v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()
    }
    x = torch.rand(3, 7, channels, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(5, (3, 7), generator=g)
    assert torch.allclose(stacked.stacked_loss(params, x, y), vmap(model.loss)(params, x, y).sum(), atol=1e-12, rtol=0)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    got = torch.autograd.grad(stacked.stacked_loss(leaves, x, y), list(leaves.values()))
    ref = vmap(grad(model.loss))(params, x, y)
    for k, gk in zip(leaves, got):
        assert torch.allclose(gk, ref[k], atol=1e-11, rtol=0), k


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("FEDMETA_ADAPT", "stackd", "FEDMETA_ADAPT: expected one of lanes, stacked, vmap, got 'stackd'"),
        ("FEDMETA_LANES", "two", "FEDMETA_LANES: expected a positive whole number, got 'two'"),
        ("FEDMETA_LANES", "0", "FEDMETA_LANES: expected a positive whole number, got '0'"),
    ],
)
def test_a_bad_implementation_switch_is_an_error_not_the_default(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    theta = tiny_params()
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(2, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(2, 6).clone()
    batches = torch.randint(6, (2, 2, 3), generator=gen)
    with pytest.raises(FedmetaError) as err:
        reptile.adapt(reptile.expand(theta, 2), x, y, batches, AdamConfig(), backend=fast.backend(x.device))
    assert str(err.value) == expected
