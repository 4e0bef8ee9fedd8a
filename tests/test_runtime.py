"""What `runtime.configure_device` switches: CUDA runs get deterministic kernels and true float32."""

from __future__ import annotations

import torch

from fedmeta import runtime


def test_cuda_runs_turn_tf32_off_and_determinism_on_and_cpu_runs_change_nothing() -> None:
    saved = (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.use_deterministic_algorithms(False)
        runtime.configure_device("cpu")
        assert torch.backends.cudnn.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
        runtime.configure_device("cuda:0")  # the flags are settable without a GPU
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.use_deterministic_algorithms(saved[2])
