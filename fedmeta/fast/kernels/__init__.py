"""Which implementation of the hand-written Conv4 step's four CPU operations runs, and why: the one selection point.

Two families of operations, each compiled in C++ or computed by torch (`implementations`):
- block 0 (`block0.cpp`): the first 3×3 convolution, batch norm, ReLU and max-pool fused, so its full-size
  activations (four times the pooled size, larger than a core's L2 cache) are never written to memory;
- the later blocks' 64 → 64 convolutions (`conv3x3.cpp`) by Winograd's F(2×2, 3×3), 2.25 times fewer
  multiplications than the direct convolution oneDNN runs. It rounds differently: float32 results agree with the
  direct convolution's to a few parts in 10⁷.

What is faster depends on the CPU: the C++ is register-blocked for the vector registers of the ISA it is built for
(32 of 64 bytes with AVX-512, 16 of 32 bytes with AVX2, `vector.h`), and oneDNN's own kernels differ by ISA as
well. So FEDMETA_KERNELS chooses:
- `auto` (default): each family's compiled and torch versions are timed against each other on Conv4's Omniglot
  shapes (batch 10, one thread, as a lane runs them) the first time a CPU meets this code, and the faster runs; the
  verdict is cached beside the compiled library, keyed by the CPU, the sources, torch's version and the ISA limits
  set in the environment, and printed when it is made;
- `compiled` / `reference`: both families one way, unmeasured;
- `portable`: both families compiled for x86-64-v3 (AVX2 + FMA) whatever the CPU, ATen's own kernels held to AVX2
  and MKL to the one code path it takes on every x86-64 CPU (`PORTABLE_ENV`, set by `fedmeta/__init__.py` before
  torch is imported), oneDNN off, and square roots correctly rounded (`portable.sqrt`): everything known to pick code
  by CPU is pinned, so that AVX-512 and AVX2 machines, Intel or AMD, can compute the same bytes (with the same torch
  build and C++ compiler; docs/performance.md says how far that has been shown).
Without a C++ compiler (or when the build fails) `auto` and `compiled` run torch's versions, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from fedmeta import PORTABLE_ENV, tracking
from fedmeta.atomic import write_text
from fedmeta.errors import FedmetaError
from fedmeta.fast.kernels import implementations

FOLDER = Path(__file__).parent
SOURCES = [FOLDER / "block0.cpp", FOLDER / "conv3x3.cpp"]
HEADER = FOLDER / "vector.h"  # included by both
CHOICES = ("auto", "compiled", "reference", "portable")
FAMILIES = ("block0", "conv3x3")
BUILDS = {"native": ["-O3", "-march=native"], "portable": ["-O3", "-march=x86-64-v3"]}
MARGIN = 0.95  # compiled runs only where it took at most this share of torch's time: a tie is not a gain


class Ops(NamedTuple):
    """The functions `conv4.features_forward` / `features_backward` call (TorchScript-compilable)."""

    block0_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    block0_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    conv3x3_forward: Callable[..., torch.Tensor]
    conv3x3_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]


class KernelChoice(NamedTuple):
    """Which implementation of each family this process runs, and why (decided once: `choose`)."""

    setting: str  # FEDMETA_KERNELS
    families: dict[str, str]  # family → "compiled" or "reference"
    build: str  # the compiled library's build ("native", "portable"), "" when none is loaded
    reason: str

    @property
    def kind(self) -> str:
        """ "compiled", "reference", or "mixed" (one family each way)."""
        kinds = set(self.families.values())
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def ops(self) -> Ops:
        def pick(family: str, op: str) -> Callable[..., object]:
            return getattr(implementations, f"{family}_{op}_{self.families[family]}")

        return Ops(
            pick("block0", "forward"),
            pick("block0", "backward"),
            pick("conv3x3", "forward"),
            pick("conv3x3", "backward"),
        )

    def tags(self) -> dict[str, str]:
        """What a run records of it (MLflow tags, the bench's JSON)."""
        return {
            "kernels": " ".join(f"{f}={k}" for f, k in self.families.items()),
            "kernels_choice": self.setting,
            "kernels_build": self.build or "none",
            "kernels_reason": self.reason,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{f"env.{k}": os.environ[k] for k in PORTABLE_ENV if k in os.environ},
        }


_chosen: KernelChoice | None = None
_loaded: str = ""  # the build whose library this process loaded: two builds register the same op names


def cache_dir() -> Path:
    """FEDMETA_CACHE, else $XDG_CACHE_HOME/fedmeta, else ~/.cache/fedmeta."""
    if os.environ.get("FEDMETA_CACHE"):
        return Path(os.environ["FEDMETA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmeta"


def cpu() -> str:
    """The CPU's model name and feature flags: a native build and a verdict hold for this CPU only."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def library_name(build: str) -> str:
    sources = b"".join(p.read_bytes() for p in (*SOURCES, HEADER))
    return (
        f"fedmeta_kernels_{build}_"
        f"{_digest(sources, ' '.join(BUILDS[build]), torch.__version__, cpu() if build == 'native' else '')}"
    )


def load_library(build: str) -> None:
    """Compile `build` once per machine (cached under `cache_dir`) and load it, registering torch.ops.fedmeta.*;
    raises whatever the build raises. A later process loads the cached library without the build check."""
    global _loaded
    if _loaded:
        if _loaded != build:
            raise FedmetaError(
                f"FEDMETA_KERNELS: the {_loaded} kernels are loaded in this process; the {build} build cannot be added"
            )
        return
    name = library_name(build)
    folder = cache_dir() / "kernels" / name
    built = folder / "built"
    if built.exists():
        torch.ops.load_library(str(folder / f"{name}.so"))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its import warns that CUDA is absent
        from torch.utils import cpp_extension

        cpp_extension.load(
            name,
            [str(s) for s in SOURCES],
            extra_cflags=BUILDS[build],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
        built.touch()
    _loaded = build


def _calibration_inputs() -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Each family's work in one Conv4-64 training step on Omniglot (batch 10, 28 × 28): block 0 forward and
    backward, and the three later convolutions (14², 7², 3²) forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 28, 28, generator=g)
    w0, shift = torch.randn(9, 64, generator=g), torch.randn(64, generator=g)
    h0, arg0 = implementations.block0_forward_reference(x, w0, shift)
    convs = []
    for side in (14, 7, 3):
        h = torch.randn(10, 64, side, side, generator=g).contiguous(memory_format=torch.channels_last)
        convs.append((h, torch.randn(64, 64, 3, 3, generator=g) * 0.05, torch.randn_like(h)))
    return {"block0": [(x, w0, shift, torch.randn_like(h0), h0, arg0)], "conv3x3": convs}


def _work(family: str, kind: str, inputs: list[tuple[torch.Tensor, ...]]) -> Callable[[], None]:
    fwd = getattr(implementations, f"{family}_forward_{kind}")
    bwd = getattr(implementations, f"{family}_backward_{kind}")

    def run() -> None:
        for t in inputs:
            if family == "block0":
                x, w, shift, dh, h, arg = t
                fwd(x, w, shift)
                bwd(x, dh, h, arg)
            else:
                h, w, dz = t
                fwd(h, w)
                bwd(dz, h, w)

    return run


def measure(rounds: int = 7, calls: int = 5) -> dict[str, dict[str, float]]:
    """ms per step of each family, compiled and reference, on one thread: the best of `rounds` rounds that
    alternate the two, so that a slow moment of the machine does not fall on one side only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = _calibration_inputs()
        best: dict[str, dict[str, float]] = {f: {"compiled": float("inf"), "reference": float("inf")} for f in FAMILIES}
        with torch.no_grad():
            for family in FAMILIES:
                work = {kind: _work(family, kind, inputs[family]) for kind in ("compiled", "reference")}
                for fn in work.values():
                    fn()  # warm-up: first-call allocations, oneDNN's primitive cache
                for _ in range(rounds):
                    for kind, fn in work.items():
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        best[family][kind] = min(best[family][kind], (time.perf_counter() - start) / calls * 1e3)
        return best
    finally:
        torch.set_num_threads(threads)


def _verdict(build: str) -> KernelChoice:
    """The cached verdict for this CPU and build, or a new measurement (printed once, then cached)."""
    pins = " ".join(f"{k}={os.environ.get(k, '')}" for k in PORTABLE_ENV)
    path = cache_dir() / "kernels" / f"verdict-{_digest(library_name(build), pins, cpu())}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return KernelChoice("auto", saved["families"], build, saved["reason"])
    times = measure()
    families = {f: "compiled" if t["compiled"] <= MARGIN * t["reference"] else "reference" for f, t in times.items()}
    shown = ", ".join(
        f"{f} {t['compiled']:.2f} ms compiled against {t['reference']:.2f} ms torch → {families[f]}"
        for f, t in times.items()
    )
    reason = f"measured on this CPU ({build} build, one thread, a Conv4-64 step of batch 10): {shown}"
    write_text(path, json.dumps({"families": families, "reason": reason, "ms": times}, indent=2) + "\n")
    print(f"fedmeta: CPU kernels {reason}; cached in {path.parent}", file=sys.stderr)
    return KernelChoice("auto", families, build, reason)


def _check_portable() -> None:
    """Portable bytes need the pinned ISA levels in force and a CPU that runs the x86-64-v3 build."""
    wrong = [f"{k}={v}" for k, v in PORTABLE_ENV.items() if os.environ.get(k) != v]
    if wrong or torch.backends.cpu.get_cpu_capability() != "AVX2":
        raise FedmetaError(
            f"FEDMETA_KERNELS=portable: {' '.join(wrong) or 'ATEN_CPU_CAPABILITY=avx2'} not in force "
            "(torch was imported before fedmeta; set them in the environment)"
        )
    flags = set(cpu().split())
    if flags and not {"avx2", "fma"} <= flags:
        raise FedmetaError("FEDMETA_KERNELS=portable: this CPU lacks AVX2 or FMA, which the x86-64-v3 build needs")


def choose() -> KernelChoice:
    """The kernels this process runs (decided once per process; see the module docstring), also recorded as
    tags of the process's MLflow runs."""
    global _chosen
    if _chosen is None:
        _chosen = _decide()
        tracking.PROCESS_TAGS.update(_chosen.tags())
        run = tracking.current()  # a run started before the first use of the kernels gets the tags too
        if run is not None:
            for key, value in _chosen.tags().items():
                run.tag(key, value)
    return _chosen


def _decide() -> KernelChoice:
    choice = os.environ.get("FEDMETA_KERNELS", "auto")
    if choice not in CHOICES:
        raise FedmetaError(f"FEDMETA_KERNELS: expected one of {', '.join(CHOICES)}, got {choice!r}")
    reference = KernelChoice(choice, dict.fromkeys(FAMILIES, "reference"), "", "FEDMETA_KERNELS=reference")
    if choice == "reference":
        return reference
    if choice == "portable":
        _check_portable()
        load_library("portable")  # a failed build is an error here: the fallback would not give the portable bytes
        # oneDNN blocks its convolutions by the CPU's cache sizes, so their sums run in another order on another
        # CPU of the same ISA; ATen's own convolution (patches times an MKL product, which MKL_CBWR pins) does not
        torch.backends.mkldnn.enabled = False
        return KernelChoice(choice, dict.fromkeys(FAMILIES, "compiled"), "portable", "FEDMETA_KERNELS=portable")
    try:
        load_library("native")
    except Exception as e:  # no compiler, no ninja, a failed build: torch's versions give the same results
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # a failed build's first line holds the whole compile command
        reason = reason if len(reason) <= 120 else reason[:119] + "…"
        warnings.warn(
            f"fedmeta: the compiled CPU kernels could not be built ({reason}); using the slower torch reference",
            stacklevel=3,
        )
        return reference._replace(reason=f"the compiled kernels could not be built: {reason}")
    if choice == "compiled":
        return KernelChoice(choice, dict.fromkeys(FAMILIES, "compiled"), "native", "FEDMETA_KERNELS=compiled")
    return _verdict("native")


def ops() -> Ops:
    """The chosen implementation of each operation."""
    return choose().ops()
