"""Experiment-level check that a CUDA run gives the CPU's results: the same work on both devices.

From one checkpoint, on the CPU and on `--device`: one federated round with the attacker (benign
Reptile users and the boosted poisoned update), then Experiments 2 and 3's measurements (fine-tuning
and the matching-network defense). Prints seconds and accuracies per device, and the largest
difference between the two devices' models after the round, as JSON. Float32 kernels differ between
devices, and Adam with β1 = 0 amplifies round-off, so expect close, not equal, numbers.

    python scripts/device_check.py --device cuda --checkpoint checkpoints/attacked_include.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fedmeta import checkpoint, config, runtime
from fedmeta.experiment import Experiment
from fedmeta.metatest import LEARNERS
from fedmeta.model import Theta
from fedmeta.scenarios import SCENARIOS
from fedmeta.splits import FederatedData


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    params: config.Config, data: FederatedData, ckpt: Path, device: torch.device, steps: list[int]
) -> tuple[dict[str, Any], Theta]:
    """Seconds and accuracies of each piece of work on `device`, and the model after the round."""
    exp = Experiment(params, data, device)
    theta = checkpoint.load_theta(ckpt, device)
    _sync(device)
    t0 = time.perf_counter()
    after = exp.round(theta, 2, include_backdoor=True, with_attacker=True)
    _sync(device)
    out: dict[str, Any] = {"round": {"seconds": round(time.perf_counter() - t0, 2)}}
    for name, make in LEARNERS.items():
        learner = make(exp)
        t0 = time.perf_counter()
        meta = exp.meta_test(theta, learner, steps, "device-check")
        attack = exp.attack_eval(theta, learner, SCENARIOS["b"], steps, "device-check", exp.benign[0])
        _sync(device)
        out[name] = {"seconds": round(time.perf_counter() - t0, 2)}
        for step, m, a in zip(steps, meta, attack):
            out[name] |= {
                f"meta_test@{step}": m["meta_test"].mean,
                f"main@{step}": a["main"].mean,
                f"attack_val@{step}": a["attack_val"].mean,
            }
    return out, {k: v.cpu() for k, v in after.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpoint", type=Path, default=runtime.CHECKPOINTS / "attacked_include.pt")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20, 50])
    args = ap.parse_args()
    params = config.load(Path("params.yaml"))
    runtime.configure(params)
    runtime.configure_device(args.device)
    data = FederatedData.load(runtime.PREPARED)
    (cpu, theta_cpu), (dev, theta_dev) = (
        measure(params, data, args.checkpoint, torch.device(d), args.steps) for d in ("cpu", args.device)
    )
    result: dict[str, Any] = {"cpu": cpu, args.device: dev}
    result["round_max_abs_theta_diff"] = max(float((theta_cpu[k] - theta_dev[k]).abs().max()) for k in theta_cpu)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
