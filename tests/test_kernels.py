"""The compiled CPU kernels (block 0 fused, Winograd convolutions) against the torch computations they replace,
and the fallback to those."""
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


def _conv_case(dtype: torch.dtype, n: int, c_in: int, c_out: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows * cols + c_out)
    h = torch.randn(n, c_in, rows, cols, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype)
    dz = torch.randn(n, c_out, rows, cols, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return h, weight, dz


# Conv4's later blocks on Omniglot (14, 7, 3) and mini-ImageNet (21: odd, a half-empty last tile), a 1×1 map, unequal
# channel counts, more tiles than one chunk (48), and a batch of one
CONV_SHAPES = [(10, 64, 64, 14, 14), (2, 64, 64, 7, 7), (3, 16, 32, 3, 3), (2, 32, 16, 21, 21), (2, 16, 16, 1, 1), (1, 16, 16, 5, 8)]


@pytest.mark.parametrize(("n", "c_in", "c_out", "rows", "cols"), CONV_SHAPES)
def test_compiled_conv3x3_equals_the_reference(n: int, c_in: int, c_out: int, rows: int, cols: int) -> None:
    """float64: Winograd's algorithm is exact arithmetic rearranged, so only round-off separates it from conv2d."""
    h, weight, dz = _conv_case(torch.float64, n, c_in, c_out, rows, cols)
    z = torch.ops.fedmeta.conv3x3_forward(h, weight)
    assert z.shape == (n, c_out, rows, cols) and z.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(z, kernels.conv3x3_forward_reference(h, weight), atol=1e-12, rtol=0)
    dh, dw = torch.ops.fedmeta.conv3x3_backward(dz, h, weight)
    dh_ref, dw_ref = kernels.conv3x3_backward_reference(dz, h, weight)
    assert dh.shape == h.shape and dw.shape == weight.shape
    assert torch.allclose(dh, dh_ref, atol=1e-12, rtol=0) and torch.allclose(dw, dw_ref, atol=1e-11, rtol=0)
    nchw = torch.ops.fedmeta.conv3x3_backward(dz.contiguous(), h.contiguous(), weight)  # any layout in, the same numbers out
    assert torch.equal(nchw[0], dh) and torch.equal(nchw[1], dw)


def test_compiled_conv3x3_in_float32_stays_within_round_off() -> None:
    h, weight, dz = _conv_case(torch.float32, 10, 64, 64, 14, 14)
    ref = [t.float() for t in (kernels.conv3x3_forward_reference(h.double(), weight.double()), *kernels.conv3x3_backward_reference(dz.double(), h.double(), weight.double()))]
    got = [torch.ops.fedmeta.conv3x3_forward(h, weight), *torch.ops.fedmeta.conv3x3_backward(dz, h, weight)]
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= 2e-6 * r.abs().max()


def test_conv3x3_shapes_the_kernel_was_not_built_for_go_to_torch() -> None:
    """Channel counts that are not whole registers (6 here) run torch's own convolution, bit for bit."""
    h, weight, dz = _conv_case(torch.float32, 2, 6, 6, 7, 7)
    assert torch.equal(torch.ops.fedmeta.conv3x3_forward(h, weight), kernels.conv3x3_forward_reference(h, weight))
    for got, ref in zip(torch.ops.fedmeta.conv3x3_backward(dz, h, weight), kernels.conv3x3_backward_reference(dz, h, weight)):
        assert torch.equal(got, ref)


def test_conv3x3_backward_rejects_a_gradient_of_the_wrong_shape() -> None:
    h, weight, dz = _conv_case(torch.float32, 2, 16, 16, 7, 7)
    with pytest.raises(RuntimeError, match=r"expected dz \[n, C_out, H, W\]"):
        torch.ops.fedmeta.conv3x3_backward(dz[:, :, :6], h, weight)


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
    warned = [line for line in out.stderr.splitlines() if "compiled CPU kernels could not be built" in line]
    assert len(warned) == 1, out.stderr


def test_an_unknown_kernel_choice_is_refused() -> None:
    out = _run("import fedmeta.model", FEDMETA_KERNELS="fast")
    assert out.returncode != 0
    assert "FEDMETA_KERNELS: expected one of compiled, reference, got 'fast'" in out.stderr
