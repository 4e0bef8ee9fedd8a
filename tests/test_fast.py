"""fedmeta.fast computes the research code's functions: the hand-written Conv4 gradient equals autograd, and
the lanes, stacked and compiled inner loops give the bits (or, across implementations, the values) of the reference."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from fedmeta import fast, model, reptile
from fedmeta.adam import AdamConfig, AdamState
from fedmeta.fast import conv4, stacked


@pytest.mark.parametrize("width", [6, 16])  # torch's convolutions, and the compiled Winograd ones (`kernels`)
@pytest.mark.parametrize(("size", "channels"), [(28, 1), (30, 1), (36, 3)])
def test_hand_written_gradient_equals_autograd(size: int, channels: int, width: int) -> None:
    """Odd sides (30 → 15 → 7 → 3) and constant patches (max-pool ties) included."""
    g = torch.Generator().manual_seed(0)
    params = {
        k: v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        for k, v in model.init_conv4(channels, width, size, 5, g).items()
    }
    x = torch.rand(7, channels, size, size, generator=g, dtype=torch.float64)
    x[:, :, :12, :12] = 1.0
    y = torch.randint(5, (7,), generator=g)
    ref = grad(model.loss)(params, x, y)
    for moments in (None, tuple(t.sum(0) for t in conv4.patch_moments(x))):
        got = conv4.loss_grad(params, x, y, moments)
        assert set(got) == set(ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], atol=1e-11, rtol=0), k


def test_inference_pooling_gives_max_pool2d_values_exactly() -> None:
    """Predictions (`conv4.embed`, `stacked.embed`) pool without autograd by pairwise maxima; the values must be
    max_pool2d's, bit for bit, on even and odd sides (7 → 3 and 3 → 1 drop the last row and column) and with ties
    and zeros as in binary images."""
    g = torch.Generator().manual_seed(3)
    for side in (28, 14, 7, 3):
        h = torch.randn(3, 4, side, side, generator=g)
        h[h.abs() < 0.5] = 0.0  # ties at zero, and negative maxima that ReLU clamps
        h[:, :, 1::2] = h[:, :, 0 : side // 2 * 2 : 2]  # rows tied within each window
        with torch.no_grad():
            pooled = conv4.relu_max_pool_values(h)
        assert torch.equal(pooled, torch.nn.functional.max_pool2d(torch.relu(h), 2))


@pytest.mark.parametrize("n_ref", [None, 4])
def test_stacked_predictions_embed_as_the_model_does(n_ref: int | None) -> None:
    """The stacked backend's embedding for predictions is `model.embed`'s, bit for bit: only the pooling differs,
    and it gives max_pool2d's values."""
    g = torch.Generator().manual_seed(5)
    params = model.init_conv4(1, 8, 30, 5, g)
    x = torch.rand(6, 1, 30, 30, generator=g)
    x[:, :, :12, :12] = 1.0  # max-pool ties
    with torch.no_grad():
        assert torch.equal(stacked.embed(params, x, n_ref), model.embed(params, x, n_ref))


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (30, 1), (36, 3)])
@pytest.mark.parametrize("n_ref", [None, 4])
def test_embedding_by_hand_equals_embed(size: int, channels: int, n_ref: int | None) -> None:
    """Predictions on lanes embed through `features_forward`: the same function as `embed`, batch-norm
    statistics from all images or from the first n_ref only (so the other images cannot move them)."""
    g = torch.Generator().manual_seed(3)
    params = {
        k: v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        for k, v in model.init_conv4(channels, 16, size, 5, g).items()
    }
    x = torch.rand(7, channels, size, size, generator=g, dtype=torch.float64)
    x[:, :, :12, :12] = 1.0
    with torch.no_grad():
        ref = model.embed(params, x, n_ref)
        got = conv4.embed(params, x, n_ref)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-11, rtol=0)
        with_tape, tape = conv4.features_forward(params, x, None, n_ref)
        assert tape is not None and torch.equal(with_tape, got)  # pooling without indices: the same maxima
        if n_ref is not None:
            moved = x.clone()
            moved[n_ref:] = 1 - moved[n_ref:]
            assert torch.allclose(conv4.embed(params, moved, n_ref)[:n_ref], got[:n_ref], atol=1e-11, rtol=0)


def test_scripted_forward_and_backward_give_the_eager_bits(one_thread) -> None:
    """The defense's lanes call `conv4.compiled()`; the JIT must not change a bit
    (third call: after it has profiled and optimised them)."""
    g = torch.Generator().manual_seed(4)
    params = {k: v for k, v in model.init_conv4(1, 16, 28, 5, g).items() if not k.startswith("fc.")}
    x = (torch.rand(9, 1, 28, 28, generator=g) < 0.2).float()
    dfeat = torch.randn(9, 16, generator=g)
    feat, tape = conv4.features_forward(params, x)
    grads = conv4.features_backward(params, tape, dfeat)
    for _ in range(3):
        feat_s, tape_s = conv4.compiled().features_forward(params, x)
        grads_s = conv4.compiled().features_backward(params, tape_s, dfeat)
    assert torch.equal(feat, feat_s) and set(grads) == set(grads_s)
    assert all(torch.equal(grads[k], grads_s[k]) for k in grads)


def episodes(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = {k: v.to(dtype) for k, v in model.init_conv4(1, 4, 28, 3, g).items()}
    x = torch.rand(n, 9, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.arange(3).repeat(3).expand(n, 9).clone()
    batches = torch.stack([torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(5)]) for _ in range(n)])
    return theta, x, y, batches


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_lanes_give_the_same_bits_as_one_lane(monkeypatch: pytest.MonkeyPatch, one_thread, beta1: float) -> None:
    """Each step is computed on one thread whatever the lane count, also for episodes that 2 or 3 lanes
    cut in two (5 episodes × 5 steps), so the count cannot change a bit."""
    theta, x, y, batches = episodes(5, torch.float32)
    cfg = AdamConfig(lr=0.01, beta1=beta1)
    runs = []
    for lanes in ("1", "2", "3"):
        monkeypatch.setenv("FEDMETA_LANES", lanes)
        assert fast.implementation(x.device) == "lanes"
        runs.append(reptile.adapt(reptile.expand(theta, 5), x, y, batches, cfg, backend=fast.backend(x.device)))
    assert torch.get_num_threads() == 1  # the lanes' own setting did not leak into the caller's thread
    (a, sa), *others = runs
    for b, sb in others:
        for k in theta:
            assert torch.equal(a[k], b[k]) and torch.equal(sa.v[k], sb.v[k]) and torch.equal(sa.m[k], sb.m[k]), k
        assert sa.step == sb.step == 5


@pytest.mark.parametrize("impl", ["lanes", "stacked"])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_implementations_equal_vmap_with_carried_adam_state(
    monkeypatch: pytest.MonkeyPatch, beta1: float, impl: str
) -> None:
    """The CPU path and the GPU default against the vmap path in float64, continuing from a carried Adam state
    (β1 ≠ 0 too)."""
    theta, x, y, batches = episodes(3, torch.float64, seed=1)
    cfg = AdamConfig(lr=0.01, beta1=beta1)
    out = {}
    for name in ("vmap", impl):
        monkeypatch.setenv("FEDMETA_ADAPT", name)
        monkeypatch.setenv("FEDMETA_LANES", "2")
        backend = fast.backend(x.device)
        params, state = reptile.adapt(reptile.expand(theta, 3), x, y, batches[:, :2], cfg, backend=backend)
        out[name] = reptile.adapt(params, x, y, batches[:, 2:], cfg, state, backend)
    (pv, sv), (pl, sl) = out["vmap"], out[impl]
    assert sv.step == sl.step == 5
    for k in theta:
        assert torch.allclose(pv[k], pl[k], atol=1e-10, rtol=0), k
        assert torch.allclose(sv.m[k], sl.m[k], atol=1e-10, rtol=0) and torch.allclose(
            sv.v[k], sl.v[k], atol=1e-12, rtol=0
        ), k


@pytest.mark.parametrize("impl", ["lanes", "stacked", "vmap"])
def test_adapt_leaves_its_inputs_alone(monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    monkeypatch.setenv("FEDMETA_ADAPT", impl)
    theta, x, y, batches = episodes(2, torch.float64)
    params = reptile.expand(theta, 2)
    state = AdamState.zeros_like(params)
    before = {k: v.clone() for k, v in params.items()}
    v_before = {k: v.clone() for k, v in state.v.items()}
    v_tensors = dict(state.v)
    reptile.adapt(params, x, y, batches, AdamConfig(), state, fast.backend(x.device))
    for k in params:
        assert torch.equal(params[k], before[k]) and torch.equal(v_tensors[k], v_before[k]), k


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_compiled_inner_loop_gives_the_eager_bits(one_thread, beta1: float) -> None:
    """The lanes run `conv4.episode_steps` as TorchScript (to leave the GIL free); it must compute exactly
    what the Python function does, also once the JIT has profiled and optimised it (its third call)."""
    theta, x, y, batches = episodes(1, torch.float32, seed=2)
    keys = list(theta)
    gram, colsum = conv4.patch_moments(x[0])
    runs = []
    for steps, calls in ((conv4.episode_steps, 1), (conv4.compiled().episode_steps, 3)):
        for _ in range(calls):
            p, v = [theta[k].clone() for k in keys], [torch.zeros_like(theta[k]) for k in keys]
            m = [torch.zeros_like(theta[k]) for k in keys] if beta1 else []
            with torch.no_grad():
                m = steps(keys, p, m, v, x[0], y[0], batches[0], gram, colsum, 0, 5, 0, 0.01, beta1, 0.999, 1e-8)
        runs.append(p + v + m)
    eager, compiled = runs
    assert len(eager) == len(compiled) == 3 * len(keys)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
