"""Few-shot evaluation: batch-norm modes and the recorded fine-tuning curve."""

from __future__ import annotations

import torch

from fedmeta import evaluation, model, reptile
from fedmeta.adam import AdamConfig
from fedmeta.episodes import Episodes
from fedmeta.evaluation import Summary


def setup_episode():
    g = torch.Generator().manual_seed(0)
    theta = reptile.expand(model.init_conv4(1, 8, 28, 5, g), 1)
    support = torch.rand(1, 10, 1, 28, 28, generator=g)
    queries = torch.rand(1, 6, 1, 28, 28, generator=g)
    return theta, support, queries


def test_support_mode_classifies_each_query_independently_of_the_others() -> None:
    theta, support, queries = setup_episode()
    stamped_batch = queries.clone()
    stamped_batch[:, 1:, :, -7:, -7:] = 1.0  # the other queries all carry the key
    a = evaluation.predict_logits(theta, support, queries, "support")[0, 0]
    b = evaluation.predict_logits(theta, support, stamped_batch, "support")[0, 0]
    assert torch.allclose(a, b, atol=1e-5)
    single = evaluation.predict_logits(theta, support, queries[:, :1], "support")[0, 0]
    assert torch.allclose(a, single, atol=1e-5)


def test_support_plus_query_mode_is_per_query_and_transductive_is_not() -> None:
    theta, support, queries = setup_episode()
    stamped_batch = queries.clone()
    stamped_batch[:, 1:, :, -7:, -7:] = 1.0
    spq = [evaluation.predict_logits(theta, support, q, "support_plus_query")[0, 0] for q in (queries, stamped_batch)]
    assert torch.allclose(spq[0], spq[1], atol=1e-5)
    ref = model.logits({k: v[0] for k, v in theta.items()}, torch.cat([support[0], queries[0, :1]]))[-1]
    assert torch.allclose(spq[0], ref, atol=1e-5)
    tr = [evaluation.predict_logits(theta, support, q, "transductive")[0, 0] for q in (queries, stamped_batch)]
    assert not torch.allclose(tr[0], tr[1], atol=1e-3)


def test_summary_is_mean_and_normal_95_interval() -> None:
    s = Summary.of(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert s.mean == 0.75
    assert abs(s.ci95 - 1.959963984540054 * 0.5 / 2) < 1e-9


def test_run_records_every_requested_step_and_learns_a_separable_task(tiny_data, tiny_exp) -> None:
    from fedmeta import episodes

    e = tiny_exp.params.evaluation
    eps = episodes.evaluation(tiny_data, tiny_data.meta_test, 5, 5, 4, torch.Generator().manual_seed(0))
    theta = model.init_conv4(1, 8, 28, 5, torch.Generator().manual_seed(0))
    points = evaluation.run(
        tiny_exp.finetuner(), theta, tiny_data.images, eps, e, [0, 5, 30], torch.Generator().manual_seed(1)
    )
    assert len(points) == 3 and all(set(p) == {"main"} for p in points)
    assert points[2]["main"].mean >= points[0]["main"].mean


def test_one_joint_prediction_equals_one_call_per_query_set() -> None:
    """`run` classifies the queries and every probe set in one call when queries are independent."""
    theta, support, queries = setup_episode()
    stamped_batch = queries.clone()
    stamped_batch[..., 20:, 20:] = 1.0
    learner = evaluation.FineTune(AdamConfig(), "support")
    state = learner.start({k: v[0] for k, v in theta.items()}, 1, torch.Generator())
    sets = {"main": queries, "probe": stamped_batch}
    joint = evaluation.set_predictor(learner, support, None, sets)(state)
    for name, x in sets.items():
        assert torch.equal(joint[name], learner.predict(state, support, None, x)), name


def test_episodes_move_to_a_device_whole() -> None:
    """Samplers draw on the CPU; `Episodes.to` moves every index tensor (the CUDA path relies on it)."""
    eps = Episodes(
        torch.arange(6).view(2, 3), torch.zeros(2, 3, dtype=torch.long), target_label=torch.ones(2, dtype=torch.long)
    )
    moved = eps.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in (moved.support, moved.support_y, moved.target_label))
    assert moved.query is None and moved.query_y is None
    assert eps.to(torch.device("cpu")).support.equal(eps.support)


def test_lanes_run_under_the_callers_grad_mode(monkeypatch) -> None:
    """Grad mode is per thread: predictions made under no_grad must not build graphs in the lane threads."""
    from fedmeta.fast import lanes

    monkeypatch.setenv("FEDMETA_LANES", "2")
    with torch.no_grad():
        off = lanes.run(2, lambda sl: torch.is_grad_enabled())
    assert off == [False, False]
    assert lanes.run(2, lambda sl: torch.is_grad_enabled()) == [True, True]


def test_the_configured_target_position_is_the_explicit_one_on_the_same_episodes(tiny_params, tiny_data) -> None:
    """The positions stage takes the attack stage's numbers for the position `evaluation.target_output` names
    instead of measuring it again: that is sound only if the configured measurement is the explicit one."""
    from fedmeta import config
    from fedmeta.experiment import Experiment, flat
    from fedmeta.scenarios import SCENARIOS

    theta = model.init_conv4(1, 8, 28, 5, torch.Generator().manual_seed(3))
    for target_output, explicit in (("last", 4), ("random", None)):
        raw = tiny_params.model_dump(mode="json")
        raw["evaluation"]["target_output"] = target_output
        exp = Experiment(config.parse(raw), tiny_data, torch.device("cpu"))
        for scenario in (SCENARIOS["a"], SCENARIOS["c"]):
            configured = exp.attack_eval(theta, exp.finetuner(), scenario, [3], "exp1")
            at = exp.attack_eval(theta, exp.finetuner(), scenario, [3], "exp1", target_at=explicit)
            other = exp.attack_eval(theta, exp.finetuner(), scenario, [3], "exp1", target_at=0)
            assert flat(configured[0]) == flat(at[0]) != flat(other[0])
