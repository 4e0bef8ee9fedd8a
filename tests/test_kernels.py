"""The compiled CPU kernels (block 0 fused, Winograd convolutions) against the torch computations they replace,
the choice between them, and the fallback to torch's. Tests of the compiled kernels skip where they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmeta.fast import kernels
from fedmeta.fast.kernels import implementations as reference

ROOT = Path(__file__).resolve().parents[1]


def _buildable() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


@pytest.fixture(scope="module")
def compiled() -> None:
    """torch.ops.fedmeta.* loaded (the build this process selected, else the native one), or the test skipped."""
    if not _buildable():
        pytest.skip("no C++ compiler or ninja here: only torch's versions exist")
    kernels.load_library(kernels.choose().build or "native")


def test_a_compiler_gives_a_measured_choice_and_its_reason() -> None:
    if not _buildable():
        pytest.skip("no C++ compiler or ninja here: torch's versions run (tested below)")
    chosen = kernels.choose()
    if chosen.setting != "auto":
        pytest.skip(f"FEDMETA_KERNELS={chosen.setting} is set")
    assert chosen.build == "native" and set(chosen.families) == set(kernels.FAMILIES)
    assert set(chosen.families.values()) <= {"compiled", "reference"} and "ms compiled against" in chosen.reason


def test_the_faster_implementation_of_each_family_is_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict follows the times (with a margin: a tie keeps torch's), and a second call reads it from the cache."""
    if not _buildable():
        pytest.skip("no C++ compiler or ninja here: there is nothing to choose between")
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    times = {"block0": {"compiled": 0.2, "reference": 5.0}, "conv3x3": {"compiled": 3.9, "reference": 4.0}}
    monkeypatch.setattr(kernels, "measure", lambda: times)
    first = kernels._verdict("native")
    assert (
        first.families == {"block0": "compiled", "conv3x3": "reference"}
        and "0.20 ms compiled against 5.00 ms" in first.reason
    )
    monkeypatch.setattr(kernels, "measure", lambda: pytest.fail("measured again"))
    assert kernels._verdict("native") == first


def _case(
    dtype: torch.dtype, channels: int, side: int, width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, channels, side, side, generator=g, dtype=dtype)
    x[:, :, : side // 2, : side // 2] = 1.0  # constant patches: windows whose four values tie
    weight = torch.randn(9 * channels, width, generator=g, dtype=dtype)
    shift = torch.randn(width, generator=g, dtype=dtype)
    return x, weight, shift


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("width", [64, 6])  # whole vector registers of channels, and single channels
@pytest.mark.parametrize(("channels", "side"), [(1, 28), (1, 7), (3, 30)])
def test_compiled_block0_equals_the_reference(channels: int, side: int, width: int) -> None:
    """float64: the same maxima, the same window chosen (the first of ties), the same gradient sums."""
    x, weight, shift = _case(torch.float64, channels, side, width, seed=side + width)
    h, arg = torch.ops.fedmeta.block0_forward(x, weight, shift)
    h_ref, arg_ref = reference.block0_forward_reference(x, weight, shift)
    assert h.shape == (5, width, side // 2, side // 2) and h.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(h, h_ref, atol=1e-12, rtol=0) and torch.equal(arg, arg_ref)
    assert (h == 0).any() and (arg == 0).any() and (arg == 3).any()  # the ReLU and every offset exercised
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for got, ref in zip(
        torch.ops.fedmeta.block0_backward(x, dh, h, arg), reference.block0_backward_reference(x, dh, h_ref, arg_ref)
    ):
        assert got.dtype == torch.float64 and torch.allclose(got, ref, atol=1e-10, rtol=0)


@pytest.mark.usefixtures("compiled")
def test_compiled_block0_in_float32_stays_within_round_off() -> None:
    x, weight, shift = _case(torch.float32, 1, 28, 64, seed=5)
    h, arg = torch.ops.fedmeta.block0_forward(x, weight, shift)
    h_ref, arg_ref = reference.block0_forward_reference(x, weight, shift)
    assert torch.allclose(h, h_ref, atol=1e-5, rtol=0) and (arg == arg_ref).float().mean() > 0.999
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(2))
    dw, dbeta = torch.ops.fedmeta.block0_backward(x, dh, h, arg)
    dw_ref, dbeta_ref = reference.block0_backward_reference(x.double(), dh.double(), h.double(), arg.double())
    assert torch.allclose(dw, dw_ref, atol=1e-4, rtol=1e-5) and torch.allclose(dbeta, dbeta_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.usefixtures("compiled")
def test_block0_rejects_images_it_was_not_built_for() -> None:
    x, weight, shift = _case(torch.float64, 1, 28, 8, seed=0)
    with pytest.raises(RuntimeError, match="1 or 3 channels"):
        torch.ops.fedmeta.block0_forward(torch.cat([x, x], dim=1), weight, shift)
    with pytest.raises(RuntimeError, match=r"weight \[9·C_in, C\]"):
        torch.ops.fedmeta.block0_forward(x, weight[:4], shift)


def _conv_case(
    dtype: torch.dtype, n: int, c_in: int, c_out: int, rows: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows * cols + c_out)
    h = torch.randn(n, c_in, rows, cols, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype)
    dz = torch.randn(n, c_out, rows, cols, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return h, weight, dz


# Conv4's later blocks on Omniglot (14, 7, 3) and mini-ImageNet (21: odd, a half-empty last tile), a 1×1 map, unequal
# channel counts, more tiles than one chunk (48), and a batch of one
CONV_SHAPES = [
    (10, 64, 64, 14, 14),
    (2, 64, 64, 7, 7),
    (3, 16, 32, 3, 3),
    (2, 32, 16, 21, 21),
    (2, 16, 16, 1, 1),
    (1, 16, 16, 5, 8),
]


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize(("n", "c_in", "c_out", "rows", "cols"), CONV_SHAPES)
def test_compiled_conv3x3_equals_the_reference(n: int, c_in: int, c_out: int, rows: int, cols: int) -> None:
    """float64: Winograd's algorithm is exact arithmetic rearranged, so only round-off separates it from conv2d."""
    h, weight, dz = _conv_case(torch.float64, n, c_in, c_out, rows, cols)
    z = torch.ops.fedmeta.conv3x3_forward(h, weight)
    assert z.shape == (n, c_out, rows, cols) and z.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(z, reference.conv3x3_forward_reference(h, weight), atol=1e-12, rtol=0)
    dh, dw = torch.ops.fedmeta.conv3x3_backward(dz, h, weight)
    dh_ref, dw_ref = reference.conv3x3_backward_reference(dz, h, weight)
    assert dh.shape == h.shape and dw.shape == weight.shape
    assert torch.allclose(dh, dh_ref, atol=1e-12, rtol=0) and torch.allclose(dw, dw_ref, atol=1e-11, rtol=0)
    # any layout in, the same numbers out
    nchw = torch.ops.fedmeta.conv3x3_backward(dz.contiguous(), h.contiguous(), weight)
    assert torch.equal(nchw[0], dh) and torch.equal(nchw[1], dw)


@pytest.mark.usefixtures("compiled")
def test_compiled_conv3x3_in_float32_stays_within_round_off() -> None:
    h, weight, dz = _conv_case(torch.float32, 10, 64, 64, 14, 14)
    ref = [
        t.float()
        for t in (
            reference.conv3x3_forward_reference(h.double(), weight.double()),
            *reference.conv3x3_backward_reference(dz.double(), h.double(), weight.double()),
        )
    ]
    got = [torch.ops.fedmeta.conv3x3_forward(h, weight), *torch.ops.fedmeta.conv3x3_backward(dz, h, weight)]
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= 2e-6 * r.abs().max()


@pytest.mark.usefixtures("compiled")
def test_conv3x3_shapes_the_kernel_was_not_built_for_go_to_torch() -> None:
    """Channel counts that are not whole registers (6 here) run torch's own convolution, bit for bit."""
    h, weight, dz = _conv_case(torch.float32, 2, 6, 6, 7, 7)
    assert torch.equal(torch.ops.fedmeta.conv3x3_forward(h, weight), reference.conv3x3_forward_reference(h, weight))
    for got, ref in zip(
        torch.ops.fedmeta.conv3x3_backward(dz, h, weight), reference.conv3x3_backward_reference(dz, h, weight)
    ):
        assert torch.equal(got, ref)


@pytest.mark.usefixtures("compiled")
def test_conv3x3_backward_rejects_a_gradient_of_the_wrong_shape() -> None:
    h, weight, dz = _conv_case(torch.float32, 2, 16, 16, 7, 7)
    with pytest.raises(RuntimeError, match=r"expected dz \[n, C_out, H, W\]"):
        torch.ops.fedmeta.conv3x3_backward(dz[:, :, :6], h, weight)


CHECK = """
import warnings
warnings.simplefilter("error" if {strict} else "always")
import torch
from torch.func import grad
from fedmeta import model
from fedmeta.fast import conv4, kernels
g = torch.Generator().manual_seed(0)
params = {{k: v.double() for k, v in model.init_conv4(1, 4, 16, 3, g).items()}}
x, y = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(2)
ref, got = grad(model.loss)(params, x, y), conv4.loss_grad(params, x, y)
assert all(torch.allclose(got[k], ref[k], atol=1e-11, rtol=0) for k in ref)
print(kernels.choose().kind)
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_the_reference_ops_run_when_asked_for() -> None:
    out = _run(CHECK.format(strict=True), FEDMETA_KERNELS="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_a_failed_build_falls_back_to_the_reference_with_one_warning(tmp_path: Path) -> None:
    out = _run(CHECK.format(strict=False), FEDMETA_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    warned = [line for line in out.stderr.splitlines() if "compiled CPU kernels could not be built" in line]
    assert len(warned) == 1, out.stderr


FIRST_USE = "import torch, fedmeta.fast; fedmeta.fast.backend(torch.device('cpu'))"  # kernels are chosen on first use


def test_importing_the_fast_code_chooses_no_kernels() -> None:
    out = _run("import fedmeta.fast, fedmeta.experiment; from fedmeta.fast import kernels; print(kernels._chosen)")
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr


def test_an_unknown_kernel_choice_is_refused() -> None:
    out = _run(FIRST_USE, FEDMETA_KERNELS="fast")
    assert out.returncode != 0
    assert "FEDMETA_KERNELS: expected one of auto, compiled, reference, portable, got 'fast'" in out.stderr


PORTABLE = """
import torch
from fedmeta.fast import kernels
from fedmeta.fast.kernels import implementations as reference
assert kernels.choose().build == "portable" and torch.backends.cpu.get_cpu_capability() == "AVX2"
g = torch.Generator().manual_seed(3)
h = torch.randn(2, 64, 7, 7, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
w = torch.randn(32, 64, 3, 3, generator=g, dtype=torch.float64)
dz = torch.randn(2, 32, 7, 7, generator=g, dtype=torch.float64)
assert torch.allclose(
    torch.ops.fedmeta.conv3x3_forward(h, w), reference.conv3x3_forward_reference(h, w), atol=1e-12, rtol=0
)
for got, ref in zip(torch.ops.fedmeta.conv3x3_backward(dz, h, w), reference.conv3x3_backward_reference(dz, h, w)):
    assert torch.allclose(got, ref, atol=1e-11, rtol=0)
x = torch.rand(3, 3, 12, 12, generator=g, dtype=torch.float64)
w0 = torch.randn(27, 16, generator=g, dtype=torch.float64)
shift = torch.zeros(16, dtype=torch.float64)
for got, ref in zip(torch.ops.fedmeta.block0_forward(x, w0, shift), reference.block0_forward_reference(x, w0, shift)):
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
""" + CHECK.format(strict=True)


def test_the_portable_build_computes_the_same_function() -> None:
    """The x86-64-v3 build (AVX2 registers, which an AVX-512 machine runs otherwise never) against torch, in float64."""
    flags = set(kernels.cpu().split())
    if not _buildable() or not {"avx2", "fma"} <= flags:
        pytest.skip("needs a C++ compiler, ninja and an AVX2 + FMA CPU")
    out = _run(PORTABLE, FEDMETA_KERNELS="portable")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "compiled"


def test_portable_mode_is_refused_once_torch_has_chosen_its_isa() -> None:
    code = "import os, torch; torch.ones(3).sum(); os.environ['FEDMETA_KERNELS'] = 'portable'; " + FIRST_USE
    out = _run(code, ATEN_CPU_CAPABILITY="default")
    assert out.returncode != 0
    assert "FEDMETA_KERNELS=portable:" in out.stderr and "not in force" in out.stderr
