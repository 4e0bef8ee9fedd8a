"""The benchmark command: its JSON and table, its FLOP count, its memory probe."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from fedmeta.cli import app


def test_bench_command_writes_the_json_and_a_table(tmp_path: Path, one_thread) -> None:
    out = tmp_path / "bench.json"
    tiny = [
        "--width",
        "4",
        "--inner-steps",
        "1",
        "--meta-batches",
        "1",
        "--eval-steps",
        "2",
        "--eval-episodes",
        "3",
        "--naive-eval-episodes",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--no-memory",
    ]
    result = CliRunner().invoke(app, ["bench", *tiny, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "meta_train" in result.output and "ratio" in result.output
    r = json.loads(out.read_text())
    assert {
        "commit",
        "torch",
        "device",
        "threads",
        "meta_train",
        "evaluation",
        "max_param_diff_float64",
        "max_param_diff_float32",
    } <= set(r)
    for phase in ("meta_train", "evaluation"):
        assert {"naive_eps_per_s", "fedmeta_eps_per_s", "ratio"} <= set(r[phase])
        assert r[phase]["naive_eps_per_s"] > 0 and r[phase]["fedmeta_eps_per_s"] > 0
    for phase in ("meta_train", "evaluation"):
        p = r[phase]
        assert (
            p["flop_limit_eps_per_s"] > 0
            and p["naive_page_faults_per_episode"] >= 0
            and p["fedmeta_page_faults_per_episode"] >= 0
        )
        assert p["fedmeta_share_of_limit"] == round(p["fedmeta_eps_per_s"] / p["flop_limit_eps_per_s"], 3)
    assert r["matmul_gflops"] > 0 and r["conv_gflops"] > 0 and "FLOP limit" in result.output
    assert r["threads"] == 1 and r["settings"]["width"] == 4
    assert r["max_param_diff_float64"] < 1e-10
    assert set(r["float32_vs_float64"]) == {"naive", "fedmeta", "vmap"}
    other = r["naive_float32_other_threads"]
    assert (
        other["threads"] == [1, 2]
        and other["max"] >= 0
        and 0 <= other["share_above_1e-5"] <= 1
        and 0 <= r["share_above_1e-5_float32"] <= 1
    )


def test_flop_count_matches_torch_flop_counter() -> None:
    """The FLOP limit's arithmetic: training one image and classifying one, as torch's counter sees the naive Conv4."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedmeta.tools import bench

    s = bench.Settings(
        width=4, image_size=16, n_way=3, inner_steps=2, inner_batch=3, eval_steps=1, eval_batch=2, eval_shots=1
    )
    net = bench.NaiveConv4(1, 4, 16, 3)
    with FlopCounterMode(display=False) as train:
        torch.nn.functional.cross_entropy(net(torch.rand(1, 1, 16, 16)), torch.tensor([2])).backward()
    with FlopCounterMode(display=False) as classify, torch.no_grad():
        net(torch.rand(1, 1, 16, 16))
    per_image, forward = train.get_total_flops(), classify.get_total_flops()
    assert bench.flops_per_episode(s) == {
        "meta_train": 2 * 3 * per_image,
        "evaluation": 1 * 2 * per_image + 3 * 2 * forward,
    }


def test_memory_probe_reports_peak_and_growth_from_a_fresh_process() -> None:
    from fedmeta.tools import bench

    s = bench.Settings(threads=1, width=4, inner_steps=1, meta_batches=1)
    m = bench.peak_rss(s, (("fedmeta", "meta_train"),))
    assert set(m) == {"fedmeta_meta_train", "fedmeta_meta_train_growth"}
    assert m["fedmeta_meta_train"] > 0 and m["fedmeta_meta_train_growth"] >= 0
