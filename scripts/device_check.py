"""Experiment-level check that a CUDA run gives the CPU's results: the same evaluations on both devices.

Runs Experiments 2 and 3's measurements (fine-tuning and the matching-network defense) from one
checkpoint, on the CPU and on `--device`, and prints accuracies and seconds per device as JSON.
Float32 kernels differ between devices, so accuracies may differ by a query or two per set, not more.

    python scripts/device_check.py --device cuda --checkpoint checkpoints/attacked_include.pt
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedmeta import checkpoint, config, runtime
from fedmeta.defense import MatchingDefense
from fedmeta.experiment import SCENARIOS, Lab
from fedmeta.splits import FederatedData


def measure(params: config.Params, data: FederatedData, ckpt: Path, device: torch.device, steps: list[int]) -> dict[str, dict[str, float]]:
    lab = Lab(params, data, device)
    theta = checkpoint.load_theta(ckpt, device)
    learners = {"finetune": lab.finetuner(), "defense": MatchingDefense(params.defense, lab.finetuner().adam, params.evaluation.n_way)}
    out: dict[str, dict[str, float]] = {}
    for name, learner in learners.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        meta = lab.meta_test(theta, learner, steps, "device-check")
        attack = lab.attack_eval(theta, learner, SCENARIOS["b"], steps, "device-check", lab.benign[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[name] = {"seconds": round(time.perf_counter() - t0, 2)}
        for step, m, a in zip(steps, meta, attack):
            out[name] |= {f"meta_test@{step}": m["meta_test"].mean, f"main@{step}": a["main"].mean, f"attack_val@{step}": a["attack_val"].mean}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpoint", type=Path, default=runtime.CHECKPOINTS / "attacked_include.pt")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20, 50])
    args = ap.parse_args()
    params = config.load(Path("params.yaml"))
    runtime.configure(params)
    data = FederatedData.load(runtime.PREPARED)
    result = {dev: measure(params, data, args.checkpoint, torch.device(dev), args.steps) for dev in ("cpu", args.device)}
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
