"""evaluation.head: where a benign user's classifier starts before fine-tuning (fedmeta.head)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from fedmeta import config, evaluation, fast, head, model, reptile
from fedmeta.errors import FedmetaError

N_WAY, K_SHOT, QUERIES = 5, 3, 7


def episodes(n_ep: int = 2) -> tuple[model.Theta, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random Conv4 and n_ep episodes whose queries are noisy copies of support images (labels of every class)."""
    g = torch.Generator().manual_seed(0)
    theta = model.init_conv4(1, 8, 28, N_WAY, g)
    sx = torch.rand(n_ep, N_WAY * K_SHOT, 1, 28, 28, generator=g)
    sy = torch.arange(N_WAY).repeat_interleave(K_SHOT).expand(n_ep, -1).clone()
    pick = torch.randint(0, N_WAY * K_SHOT, (n_ep, QUERIES), generator=g)
    qx = sx[torch.arange(n_ep)[:, None], pick] + 0.3 * torch.rand(n_ep, QUERIES, 1, 28, 28, generator=g)
    return theta, sx, sy, qx


def learner(rule: config.Head, impl: str = "vmap") -> evaluation.FineTune:
    return evaluation.FineTune(reptile.AdamConfig(), "support", fast.backend(torch.device("cpu"), impl), rule)


@pytest.mark.parametrize("impl", ["lanes", "vmap"])
def test_zero_head_gives_every_output_the_same_logit_before_the_first_step(impl: str) -> None:
    theta, sx, sy, qx = episodes()
    params, _ = learner("zero", impl).start(theta, 2, torch.Generator(), (sx, sy))
    logits = evaluation.predict_logits(params, sx, qx, "support")
    assert logits.shape == (2, QUERIES, N_WAY)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert torch.equal(params["conv0.weight"][0], theta["conv0.weight"])  # the embedding is kept


@pytest.mark.parametrize("impl", ["lanes", "vmap"])
def test_prototype_head_is_the_nearest_prototype_classifier_before_the_first_step(impl: str) -> None:
    """Each implementation's embedding (the hand-written one on lanes, autograd's under vmap) sets the head."""
    theta, sx, sy, qx = episodes()
    params, _ = learner("prototype", impl).start(theta, 2, torch.Generator(), (sx, sy))
    with torch.no_grad():
        logits = evaluation.predict_logits(params, sx, qx, "support")
    for e in range(2):
        with torch.no_grad():  # batch norm with the support set's statistics, as under bn_mode support
            f = model.embed(theta, torch.cat([sx[e], qx[e]]), N_WAY * K_SHOT)
        f_s, f_q = f[: N_WAY * K_SHOT], f[N_WAY * K_SHOT :]
        prototypes = torch.stack([f_s[sy[e] == k].mean(0) for k in range(N_WAY)])
        distances = torch.cdist(f_q, prototypes).square()
        assert torch.equal(logits[e].argmax(-1), distances.argmin(-1))
        # W·f + b = ‖f‖² − ‖f − c_k‖²: the negative squared distance up to a per-query constant
        expected = f_q.square().sum(-1, keepdim=True) - distances
        assert torch.allclose(logits[e], expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
    assert len(set(logits.argmax(-1).flatten().tolist())) > 1  # the fixture does not make it trivially constant


def test_prototype_and_zero_heads_need_the_support_set_and_shared_does_not() -> None:
    theta, sx, sy, _ = episodes()
    assert learner("shared").start(theta, 2, torch.Generator())[0]["fc.weight"].shape == (2, N_WAY, 8)
    for rule in ("zero", "prototype"):
        with pytest.raises(ValueError, match=rule):
            learner(rule).start(theta, 2, torch.Generator())


class Unchanged(evaluation.FineTune):
    """FineTune as it was before the head rule existed: every episode starts from θ as sent."""

    def start(self, theta, n_episodes, g, support=None):  # type: ignore[no-untyped-def]
        params = reptile.expand(theta, n_episodes)
        return params, reptile.AdamState.zeros_like(params)


def test_shared_head_is_byte_identical_to_fine_tuning_without_the_head_rule(tiny_data, tiny_exp) -> None:
    """The measurements every stage makes (meta-test; main task and backdoor) with the default head, against the
    same with FineTune's start as it was before the head rule."""
    from fedmeta.scenarios import SCENARIOS

    assert tiny_exp.params.evaluation.head == "shared" and tiny_exp.finetuner().head == "shared"
    theta = model.init_conv4(1, 8, 28, 5, torch.Generator().manual_seed(0))
    before = Unchanged(tiny_exp.finetuner().adam, tiny_exp.params.evaluation.bn_mode)
    for scenario in SCENARIOS.values():
        ours, theirs = (
            tiny_exp.attack_eval(theta, u, scenario, [0, 3, 6], "t") for u in (tiny_exp.finetuner(), before)
        )
        assert ours == theirs
    ours, theirs = (tiny_exp.meta_test(theta, u, [0, 4], "t") for u in (tiny_exp.finetuner(), before))
    assert ours == theirs
    sx = torch.rand(4, 5, 1, 28, 28)
    ours = learner("shared").start(theta, 4, torch.Generator(), (sx, torch.arange(5).expand(4, -1)))[0]
    assert all(torch.equal(ours[k], p.expand_as(ours[k])) for k, p in theta.items())


def test_head_rules_move_only_the_classifier() -> None:
    theta, sx, sy, _ = episodes()
    params = reptile.expand(theta, 2)
    for rule in ("zero", "prototype"):
        out = head.initial(params, rule, sx, sy)
        assert all(torch.equal(out[k], params[k]) for k in model.EMBEDDING_KEYS)
        assert not torch.equal(out["fc.weight"], params["fc.weight"])


def test_a_bad_head_is_refused_in_one_line_naming_evaluation_head() -> None:
    from conftest import tiny_raw

    raw = tiny_raw()
    raw["evaluation"]["head"] = "proto"
    with pytest.raises(FedmetaError) as err:
        config.parse(raw)
    message = str(err.value)
    assert "evaluation.head" in message and "'proto'" in message and "\n" not in message


def test_the_defenses_table_sets_each_defense_beside_the_shared_head() -> None:
    from fedmeta import report
    from fedmeta.scenarios import ATTACKER_OUTPUT, PRETRAINED, RANDOM_OUTPUT

    def point(backdoor: float) -> dict[str, float]:
        return {"main": 0.9, "attack_train": backdoor, "attack_val": backdoor}

    heads = {
        "a": {
            rule: {
                "steps": 50,
                "meta_test": meta,
                "meta_test_ci95": 0.02,
                ATTACKER_OUTPUT: point(b),
                RANDOM_OUTPUT: point(0.1),
                PRETRAINED: point(0.05),
            }
            for rule, meta, b in (("prototype", 0.96, 0.3), ("shared", 0.95, 0.97), ("zero", 0.93, 0.2))
        }
    }
    ablation = [
        {"removed": removed, "scenario": "a", "steps": 50, "meta_test": 0.90, "meta_test_ci95": 0.03, **point(0.35)}
        for removed in ("none", "attention", "defense")
    ]
    lines = report.defenses_table(
        heads, ablation, (ATTACKER_OUTPUT, RANDOM_OUTPUT), ATTACKER_OUTPUT, PRETRAINED
    ).splitlines()
    assert len(lines) == 2 + 5  # header; three heads, the matching network and one ablation row ("defense" is shared)
    first = [line.split(" | ")[0].removeprefix("| ") for line in lines[2:5]]
    assert first == ["none: the shared head (Exp. 2)", "zero head", "prototype head"]  # whatever the files' key order
    zero = next(line for line in lines if line.startswith("| zero head"))
    assert "| 20.0 / 20.0 | 10.0 / 10.0 | 5.0 / 5.0 | 90.0 | 93.0 ± 2.0 | -2.0 | 50 |" in zero
    full = next(line for line in lines if "full defense" in line)
    assert "| 35.0 / 35.0 | 35.0 / 35.0 | — |" in full and "| -5.0 |" in full  # the matching head is position-free
    softmax = next(line for line in lines if "softmax head" in line)
    assert "| 35.0 / 35.0 | — | — |" in softmax  # part of the shared head: measured only at the attacker's output


@pytest.mark.pipeline
def test_the_heads_stage_measures_every_rule_and_repeats_experiment_2_for_the_shared_head(tiny_repo) -> None:
    """The shared head at the attacker's output is Experiment 2's final point for benign user 2, the ablation's
    "no defense" row: the same episodes and batches, so the same numbers, to the last digit."""
    import json

    ablation = json.loads((tiny_repo / "metrics/ablation.json").read_text())
    for variant, scenarios in (("exclude", "a"), ("include", "bc")):
        heads = json.loads((tiny_repo / f"metrics/heads_{variant}.json").read_text())
        assert sorted(heads) == list(scenarios)
        for s in scenarios:
            assert sorted(heads[s]) == sorted(get_args(config.Head))
            assert all(
                set(r) >= {"steps", "meta_test", "attacker_output", "random_output", "pretrained"}
                for r in heads[s].values()
            )
            shared, none = heads[s]["shared"], ablation[f"defense.{s}"]
            assert shared["steps"] == none["steps"] and shared["meta_test"] == none["meta_test"]
            assert all(shared["attacker_output"][k] == none[k] for k in ("main", "attack_train", "attack_val"))
    report = (tiny_repo / "metrics/report.md").read_text()
    assert "## User-side defenses" in report and "| prototype head | c |" in report
