"""The compiled block-0 kernels against the torch computations they replace, and the fallback to those."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmeta import kernels, model

ROOT = Path(__file__).resolve().parents[1]


def test_the_compiled_kernels_are_what_runs_where_a_compiler_is() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or ninja here: the reference ops run (tested below)")
    assert kernels.backend == "compiled"


def _case(dtype: torch.dtype, channels: int, side: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, channels, side, side, generator=g, dtype=dtype)
    x[:, :, : side // 2, : side // 2] = 1.0  # constant patches: windows whose four values tie
    weight = torch.randn(9 * channels, width, generator=g, dtype=dtype)
    shift = torch.randn(width, generator=g, dtype=dtype)
    return x, weight, shift


@pytest.mark.parametrize("width", [64, 6])  # 16-channel vector blocks, and single channels
@pytest.mark.parametrize(("channels", "side"), [(1, 28), (1, 7), (3, 30)])
def test_compiled_block0_equals_the_reference(channels: int, side: int, width: int) -> None:
    """float64: the same maxima, the same window chosen (the first of ties), the same gradient sums."""
    x, weight, shift = _case(torch.float64, channels, side, width, seed=side + width)
    h, arg = torch.ops.fedmeta.block0_forward(x, weight, shift)
    h_ref, arg_ref = kernels.block0_forward_reference(x, weight, shift)
    assert h.shape == (5, width, side // 2, side // 2) and h.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(h, h_ref, atol=1e-12, rtol=0) and torch.equal(arg, arg_ref)
    assert (h == 0).any() and (arg == 0).any() and (arg == 3).any()  # the ReLU and every offset exercised
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for got, ref in zip(torch.ops.fedmeta.block0_backward(x, dh, h, arg), kernels.block0_backward_reference(x, dh, h_ref, arg_ref)):
        assert got.dtype == torch.float64 and torch.allclose(got, ref, atol=1e-10, rtol=0)


def test_compiled_block0_in_float32_stays_within_round_off() -> None:
    x, weight, shift = _case(torch.float32, 1, 28, 64, seed=5)
    h, arg = torch.ops.fedmeta.block0_forward(x, weight, shift)
    h_ref, arg_ref = kernels.block0_forward_reference(x, weight, shift)
    assert torch.allclose(h, h_ref, atol=1e-5, rtol=0) and (arg == arg_ref).float().mean() > 0.999
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(2))
    dw, dbeta = torch.ops.fedmeta.block0_backward(x, dh, h, arg)
    dw_ref, dbeta_ref = kernels.block0_backward_reference(x.double(), dh.double(), h.double(), arg.double())
    assert torch.allclose(dw, dw_ref, atol=1e-4, rtol=1e-5) and torch.allclose(dbeta, dbeta_ref, atol=1e-4, rtol=1e-5)


def test_block0_rejects_images_it_was_not_built_for() -> None:
    x, weight, shift = _case(torch.float64, 1, 28, 8, seed=0)
    with pytest.raises(RuntimeError, match="1 or 3 channels"):
        torch.ops.fedmeta.block0_forward(torch.cat([x, x], dim=1), weight, shift)
    with pytest.raises(RuntimeError, match=r"weight \[9·C_in, C\]"):
        torch.ops.fedmeta.block0_forward(x, weight[:4], shift)


CHECK = """
import warnings
warnings.simplefilter("error" if {strict} else "always")
import torch
from torch.func import grad
from fedmeta import kernels, model
g = torch.Generator().manual_seed(0)
params = {{k: v.double() for k, v in model.init_conv4(1, 4, 16, 3, g).items()}}
x, y = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(2)
ref, got = grad(model.loss)(params, x, y), model.loss_grad(params, x, y)
assert all(torch.allclose(got[k], ref[k], atol=1e-11, rtol=0) for k in ref)
print(kernels.backend)
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_the_reference_ops_run_when_asked_for() -> None:
    out = _run(CHECK.format(strict=True), FEDMETA_KERNELS="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_a_failed_build_falls_back_to_the_reference_with_one_warning(tmp_path: Path) -> None:
    out = _run(CHECK.format(strict=False), TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    warned = [line for line in out.stderr.splitlines() if "compiled block-0 kernels could not be built" in line]
    assert len(warned) == 1, out.stderr


def test_an_unknown_kernel_choice_is_refused() -> None:
    out = _run("import fedmeta.model", FEDMETA_KERNELS="fast")
    assert out.returncode != 0
    assert "FEDMETA_KERNELS: expected one of compiled, reference, got 'fast'" in out.stderr
