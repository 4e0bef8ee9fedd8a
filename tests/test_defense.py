"""The matching-network defense: re-initialisation, attention, the two training phases, and the Learner contract."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fedmeta import evaluation, fast, model
from fedmeta.adam import AdamConfig
from fedmeta.config import Defense, Evaluation
from fedmeta.defense import (
    ADAM_BETA1,
    MatchingDefense,
    MatchingState,
    gates,
    glorot_like,
    init_head,
    matching_log_probs,
    noisy_reinit,
    scales,
)
from fedmeta.episodes import Episodes, inner_batches
from fedmeta.errors import FedmetaError

N_WAY, WIDTH, SIDE = 3, 8, 28
DIM = WIDTH * model.feature_size(SIDE) ** 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and spinning OpenMP workers stall badly on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def theta() -> model.Theta:
    return model.init_conv4(1, WIDTH, SIDE, N_WAY, gen(0))


def patterns(per_class: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Trivially separable classes: horizontal stripes, vertical stripes, a bright block; plus faint noise."""
    base = torch.zeros(N_WAY, 1, SIDE, SIDE)
    base[0, :, ::4, :] = 1
    base[1, :, :, ::4] = 1
    base[2, :, :14, :14] = 1
    x = base.repeat_interleave(per_class, 0) + 0.05 * torch.randn(N_WAY * per_class, 1, SIDE, SIDE, generator=g)
    return x, torch.arange(N_WAY).repeat_interleave(per_class)


def episodes_of(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unsqueeze(0).expand(n, *x.shape)


def learner(**kw: object) -> MatchingDefense:
    cfg = Defense(**{"delta": 0.3, "head_steps": 3, "lr": 0.01, **kw})
    return MatchingDefense(cfg, AdamConfig(), N_WAY)


def first(params: model.Theta) -> model.Theta:
    return {k: v[0] for k, v in params.items()}


def test_gates_stay_in_unit_interval_under_a_huge_learning_rate(theta: model.Theta) -> None:
    sx, sy = patterns(3, gen(1))
    defense = learner(lr=1.0, head_steps=10)  # the largest rate params.yaml allows
    state = defense.start(theta, 2, gen(2))
    state = defense.train(state, episodes_of(sx, 2), episodes_of(sy, 2), inner_batches(9, 30, 4, 2, gen(3)))
    alpha = gates(state.head)
    assert alpha.shape == (2, N_WAY, DIM)
    assert torch.all((alpha >= 0) & (alpha <= 1))  # NaN fails too
    assert not torch.equal(state.head["gate"], torch.zeros_like(state.head["gate"]))
    assert torch.all(scales(state.head) > 0)


def test_noisy_reinit_keeps_theta_at_delta_one_and_mixes_at_delta_point_three(theta: model.Theta) -> None:
    x, _ = patterns(2, gen(1))
    same = noisy_reinit(theta, 1.0, gen(5))
    assert all(torch.equal(same[k], theta[k]) for k in theta)
    assert torch.equal(model.embed(same, x), model.embed(theta, x))

    mixed = noisy_reinit(theta, 0.3, gen(5))
    fresh = glorot_like(theta, gen(5))
    for k, p in theta.items():
        torch.testing.assert_close(mixed[k], 0.3 * p + 0.7 * fresh[k])
    assert not torch.allclose(model.embed(mixed, x), model.embed(theta, x))
    assert torch.equal(fresh["bn0.weight"], torch.ones(WIDTH)) and torch.equal(fresh["bn0.bias"], torch.zeros(WIDTH))


def test_start_draws_one_glorot_init_per_episode(theta: model.Theta) -> None:
    state = learner().start(theta, 2, gen(7))
    g = gen(7)
    expected = [noisy_reinit(theta, 0.3, g) for _ in range(2)]
    assert "fc.weight" not in state.theta
    for k, p in state.theta.items():
        assert torch.equal(p[0], expected[0][k]) and torch.equal(p[1], expected[1][k])
    assert not torch.equal(state.theta["conv0.weight"][0], state.theta["conv0.weight"][1])
    kept = MatchingDefense(Defense(), AdamConfig(), N_WAY, reinit=False).start(theta, 2, gen(7))
    assert all(torch.equal(kept.theta[k][1], theta[k]) for k in kept.theta)


def embedded(theta: model.Theta, sx: torch.Tensor, qx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x_i) and f(x̂_q), embedded together on the support set's batch-norm statistics, as `predict` does."""
    emb = model.embed(theta, torch.cat([sx, qx]), n_ref=len(sx))
    return emb[: len(sx)], emb[len(sx) :]


def reference_log_probs(
    theta: model.Theta, head: model.Theta, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, skip: int | None = None
) -> torch.Tensor:
    """The paper's formula written out literally: softmax over β_l·cos(α_l ⊙ f(x̂), f(x_i)), summed per class;
    support example `skip` is no reference (its batch-norm statistics still count)."""
    f_s, f_q = embedded(theta, sx, qx)
    alpha, beta = gates(head), scales(head)
    refs = [i for i in range(len(sx)) if i != skip]
    scores = torch.stack(
        [F.cosine_similarity(alpha[sy[i]] * f_q, f_s[i].expand_as(f_q), dim=-1) * beta[sy[i]] for i in refs], dim=1
    )
    sy = sy[refs]
    attention = scores.softmax(-1)
    return torch.stack([attention[:, sy == c].sum(-1) for c in range(N_WAY)], dim=1).log()


def test_attention_is_a_distribution_over_support_labels(theta: model.Theta) -> None:
    sx, sy = patterns(2, gen(1))
    qx, _ = patterns(3, gen(2))
    head = first(init_head(N_WAY, DIM, 1, torch.device("cpu")))
    head["gate"] = torch.randn(N_WAY, DIM, generator=gen(3))
    head["log_scale"] = torch.randn(N_WAY, generator=gen(4))
    log_probs = matching_log_probs(*embedded(theta, sx, qx), sy, head, N_WAY)
    probs = log_probs.exp()
    assert probs.shape == (len(qx), N_WAY)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(qx)))
    torch.testing.assert_close(log_probs, reference_log_probs(theta, head, sx, sy, qx))


def test_exclusion_masks_a_query_own_copy(theta: model.Theta) -> None:
    sx, sy = patterns(2, gen(1))
    head = first(init_head(N_WAY, DIM, 1, torch.device("cpu")))
    idx = torch.tensor([0, 3])
    own = idx[:, None] == torch.arange(len(sx))
    masked = matching_log_probs(*embedded(theta, sx, sx[idx]), sy, head, N_WAY, own)
    for row, i in enumerate(idx.tolist()):
        torch.testing.assert_close(masked[row], reference_log_probs(theta, head, sx, sy, sx[i : i + 1], skip=i)[0])
    torch.testing.assert_close(masked.exp().sum(-1), torch.ones(2))


def test_phase_one_trains_only_the_head_then_theta_joins(theta: model.Theta) -> None:
    sx, sy = patterns(3, gen(1))
    x, y = episodes_of(sx, 2), episodes_of(sy, 2)
    defense = learner(head_steps=3)
    start = defense.start(theta, 2, gen(2))
    initial_theta = {k: p.clone() for k, p in start.theta.items()}
    initial_head = {k: p.clone() for k, p in start.head.items()}
    batches = inner_batches(9, 4, 4, 2, gen(3))
    phase1 = defense.train(start, x, y, batches[:, :3])
    assert all(torch.equal(phase1.theta[k], initial_theta[k]) for k in initial_theta)
    assert all(not torch.equal(phase1.head[k], initial_head[k]) for k in initial_head)
    phase2 = defense.train(phase1, x, y, batches[:, 3:])
    assert phase2.step == 4
    assert all(not torch.equal(phase2.theta[k], initial_theta[k]) for k in initial_theta)


def test_matching_recovers_separable_labels_before_and_after_training(theta: model.Theta) -> None:
    sx, sy = patterns(3, gen(1))
    qx, qy = patterns(4, gen(2))
    x, y, q = episodes_of(sx, 2), episodes_of(sy, 2), episodes_of(qx, 2)
    defense = learner()
    state = defense.start(theta, 2, gen(3))
    assert torch.equal(defense.predict(state, x, y, q), episodes_of(qy, 2))
    state = defense.train(state, x, y, inner_batches(9, 6, 4, 2, gen(4)))
    assert torch.equal(defense.predict(state, x, y, q), episodes_of(qy, 2))


def test_training_in_segments_equals_one_run(theta: model.Theta) -> None:
    sx, sy = patterns(3, gen(1))
    x, y = episodes_of(sx, 2), episodes_of(sy, 2)
    batches = inner_batches(9, 7, 4, 2, gen(3))
    defense = learner(head_steps=5)
    whole = defense.train(defense.start(theta, 2, gen(2)), x, y, batches)
    split = defense.train(defense.train(defense.start(theta, 2, gen(2)), x, y, batches[:, :3]), x, y, batches[:, 3:])
    assert isinstance(split, MatchingState) and split.step == whole.step == 7
    for k in whole.theta:
        torch.testing.assert_close(split.theta[k], whole.theta[k], rtol=0, atol=0)
    for k in whole.head:
        torch.testing.assert_close(split.head[k], whole.head[k], rtol=0, atol=0)
    assert defense.predict(whole, x, y, episodes_of(sx[:5], 2)).shape == (2, 5)


def test_one_shot_support_is_rejected(theta: model.Theta) -> None:
    sx, sy = patterns(1, gen(1))
    defense = learner()
    with pytest.raises(FedmetaError, match="k_shot"):
        defense.train(
            defense.start(theta, 1, gen(2)), episodes_of(sx, 1), episodes_of(sy, 1), inner_batches(3, 1, 2, 1, gen(3))
        )


def test_softmax_ablation_is_finetune_on_the_reinitialised_model(theta: model.Theta) -> None:
    sx, sy = patterns(3, gen(1))
    x, y, q = episodes_of(sx, 2), episodes_of(sy, 2), episodes_of(patterns(2, gen(2))[0], 2)
    batches = inner_batches(9, 3, 4, 2, gen(3))
    ablation = MatchingDefense(Defense(lr=0.01), AdamConfig(), N_WAY, reinit=False, use_attention=False)
    finetune = evaluation.FineTune(AdamConfig(lr=0.01, beta1=ADAM_BETA1), "support")  # the defense's Adam
    ours = ablation.train(ablation.start(theta, 2, gen(4)), x, y, batches)
    theirs = finetune.train(finetune.start(theta, 2, gen(4)), x, y, batches)
    assert all(torch.equal(ours[0][k], theirs[0][k]) for k in theirs[0])
    assert torch.equal(ablation.predict(ours, x, y, q), finetune.predict(theirs, x, y, q))
    noisy = MatchingDefense(Defense(), AdamConfig(), N_WAY, use_attention=False).start(theta, 2, gen(4))
    g = gen(4)
    torch.testing.assert_close(noisy[0]["fc.weight"][0], noisy_reinit(theta, 0.3, g)["fc.weight"])


@pytest.mark.parametrize("use_attention", [True, False])
def test_runs_end_to_end_through_evaluation(theta: model.Theta, use_attention: bool) -> None:
    sx, _ = patterns(3, gen(1))
    qx, _ = patterns(1, gen(2))
    images = (torch.cat([sx, qx]).clamp(0, 1) * 255).to(torch.uint8)
    support = torch.arange(9).expand(2, -1).clone()
    eps = Episodes(
        support,
        torch.arange(N_WAY).repeat_interleave(3).expand(2, -1).clone(),
        torch.arange(9, 12).expand(2, -1).clone(),
        torch.arange(N_WAY).expand(2, -1).clone(),
    )
    cfg = Evaluation(n_way=N_WAY, k_shot=3, steps=4, batch=4)
    defense = MatchingDefense(Defense(head_steps=2, lr=0.01), AdamConfig(), N_WAY, use_attention=use_attention)
    points = evaluation.run(defense, theta, images, eps, cfg, [0, 2, 4], gen(3))
    assert len(points) == 3 and all(0.0 <= p["main"].mean <= 1.0 for p in points)


def test_cpu_lanes_with_hand_gradients_equal_the_vmap_autograd_path(
    theta: model.Theta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path (episodes on threads, the embedding's gradient by hand) against vmap(grad) in float64,
    across the head-only phase and the joint phase."""
    theta64 = {k: v.double() for k, v in theta.items()}
    sx, sy = patterns(3, gen(1))
    x, y = episodes_of(sx.double(), 3), episodes_of(sy, 3)
    batches = inner_batches(9, 6, 4, 3, gen(3))
    out = {}
    for impl in ("vmap", "lanes"):
        monkeypatch.setenv("FEDMETA_LANES", "2")
        defense = replace(learner(head_steps=2), backend=fast.backend(x.device, impl))
        state = defense.train(defense.start(theta64, 3, gen(2)), x, y, batches)
        out[impl] = (state, defense.predict(state, x, y, episodes_of(sx.double(), 3)))
    (sv, pv), (sl, pl) = out["vmap"], out["lanes"]
    assert isinstance(sv, MatchingState) and isinstance(sl, MatchingState)
    for k in sv.theta:
        torch.testing.assert_close(sl.theta[k], sv.theta[k], rtol=0, atol=1e-10)
    for k in sv.head:
        torch.testing.assert_close(sl.head[k], sv.head[k], rtol=0, atol=1e-10)
    assert torch.equal(pl, pv)


def test_lane_count_does_not_change_a_bit(theta: model.Theta, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each episode's steps run on one thread, also when 2 or 3 lanes cut its run of steps in two, inside the
    head-only phase (whose support embeddings are reused) or across its end."""
    sx, sy = patterns(3, gen(1))
    x, y = episodes_of(sx, 4), episodes_of(sy, 4)
    batches = inner_batches(9, 5, 4, 4, gen(3))
    defense = replace(learner(head_steps=3), backend=fast.backend(x.device, "lanes"))
    runs = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("FEDMETA_LANES", n)
        runs.append(defense.train(defense.start(theta, 4, gen(2)), x, y, batches))
    for other in runs[1:]:
        assert isinstance(other, MatchingState) and other.step == runs[0].step == 5
        for mine, theirs in (
            (other.theta, runs[0].theta),
            (other.head, runs[0].head),
            (other.theta_adam.m, runs[0].theta_adam.m),
            (other.head_adam.v, runs[0].head_adam.v),
        ):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert (other.theta_adam.step, other.head_adam.step) == (2, 5)


def test_the_defense_trains_with_its_own_adam_settings() -> None:
    """`defense.lr` and ADAM_BETA1 set the defense's Adam whatever Adam it is given; β2 comes from it."""
    made = MatchingDefense(Defense(lr=0.02), AdamConfig(lr=0.3, beta1=0.0, beta2=0.99), N_WAY)
    assert (made._adam.lr, made._adam.beta1, made._adam.beta2) == (0.02, ADAM_BETA1, 0.99)
