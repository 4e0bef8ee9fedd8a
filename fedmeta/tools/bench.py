"""`fedmeta bench`: the project's inner loops against the naive per-episode loop, timed in one process.

The naive reference is what one would write without this project: per episode a
`copy.deepcopy` of an nn.Module Conv4 (model.py's architecture: 4 × conv3×3 without
bias → BatchNorm2d → ReLU → 2×2 max-pool, then a linear layer) and a fresh
`torch.optim.Adam(betas=(0, 0.999))`, stepped with autograd. It is kept here, as
the baseline, and run on exactly the episodes (same seeds) that the project's
`reptile.meta_train` and `evaluation.run` get:

- meta-training: Reptile with the paper's Omniglot Conv4-64 settings (5-way 10-shot,
  e = 10 inner steps of batch b = 10, meta-batch B = 5), outer step included;
- evaluation: 5-way 5-shot fine-tuning, 50 steps of batch 10, then classifying the
  queries; the project fine-tunes all `eval_episodes` episodes in one call, as the
  pipeline does; the naive loop takes them one by one (fewer of them: its cost per
  episode does not depend on how many there are).

Images are synthetic (seeded), binary like Omniglot's strokes, so max-pool windows hold
ties as real data does. Timings alternate naive and project runs (ABBA order) and
report medians; the ratio is project / naive. Memory comes from one fresh process
per side and phase: its peak RSS (VmHWM, else `ru_maxrss`), and the growth of that peak while
the phase runs (after a tiny warm-up unit). The parameter check
adapts one meta-batch with both implementations from the same θ and reports the
largest absolute difference, in float64 and in float32 (where Adam with β1 = 0,
which divides each gradient by its own magnitude, turns round-off in near-zero
gradient components into steps of up to lr), and how far each float32 result is
from the float64 one.

Each phase also gets its FLOP limit: the episodes per second that its convolutions and
classifier (`flops_per_episode`) would allow at the faster of two float32 rates measured
at the start, a 1024² matrix product and Conv4's own 3×3 64 → 64 convolution (on x86 the
second, oneDNN's, can run at twice MKL's matrix rate); `fedmeta_share_of_limit` is how
much of it the project reaches. The limit counts a direct convolution's multiply-adds; the
project's compiled Winograd convolutions (`kernels`) need fewer (2.25 times fewer in full
tiles), so on the CPU its share is not bounded by 1. Page faults per episode are recorded per side: the naive
loop's speed depends on them (glibc maps every large tensor afresh, and the kernel zeroes each
page), and they vary with what the process allocated before.

With more threads than free cores (a busy machine) the naive loop's OpenMP
kernels slow down many times over while the project's lanes (one thread each) do
not, so ratios taken there overstate the gain; `load_average_before_after` is
recorded for that reason, and `--threads 1` compares one core against one core.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmeta import fast, model, reptile, runtime
from fedmeta.adam import AdamConfig
from fedmeta.backend import Backend
from fedmeta.config import Evaluation, Reptile
from fedmeta.episodes import Episodes, inner_batches
from fedmeta.evaluation import FineTune
from fedmeta.evaluation import run as evaluate
from fedmeta.fast import kernels, lanes
from fedmeta.model import Theta


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does; the defaults are the paper's Omniglot Conv4-64 settings."""

    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    repeats: int = 3
    seed: int = 0
    width: int = 64
    image_size: int = 28
    channels: int = 1
    n_way: int = 5
    lr: float = 0.001
    # meta-training
    train_shots: int = 10
    inner_steps: int = 10
    inner_batch: int = 10
    meta_batch: int = 5
    outer_step: float = 0.1
    meta_batches: int = 4  # per timed run
    # evaluation
    eval_shots: int = 5
    eval_steps: int = 50
    eval_batch: int = 10
    eval_episodes: int = 40  # the project's call, as in the pipeline
    naive_eval_episodes: int = 8  # the naive loop's per timed run
    memory: bool = True


# The two datasets' shapes and meta-training shots (params.yaml's datasets.*.train_shots), for `--dataset`.
DATASETS: dict[str, dict[str, int]] = {
    "omniglot": {"image_size": 28, "channels": 1, "train_shots": 10},
    "miniimagenet": {"image_size": 84, "channels": 3, "train_shots": 15},
}


# ---- the naive reference ----


class NaiveConv4(nn.Module):
    """model.py's Conv4 as an ordinary nn.Module."""

    def __init__(self, channels: int, width: int, image_size: int, n_way: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for _ in range(model.BLOCKS):
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width, eps=model.BN_EPS),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width * model.feature_size(image_size) ** 2, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))

    def _pairs(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for i in range(model.BLOCKS):
            conv, bn = self.features[4 * i], self.features[4 * i + 1]
            out += [(f"conv{i}.weight", conv.weight), (f"bn{i}.weight", bn.weight), (f"bn{i}.bias", bn.bias)]
        return out + [("fc.weight", self.fc.weight), ("fc.bias", self.fc.bias)]

    def load(self, params: Theta) -> NaiveConv4:
        with torch.no_grad():
            for k, p in self._pairs():
                p.copy_(params[k])
        return self

    def params(self) -> Theta:
        return {k: p.detach().clone() for k, p in self._pairs()}


def naive_episode(net: NaiveConv4, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, lr: float) -> NaiveConv4:
    """One episode the naive way: deep copy, a new Adam, autograd steps over the inner batches [steps, b]."""
    m = copy.deepcopy(net)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(0.0, 0.999))
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
    return m


def naive_meta_train(
    net: NaiveConv4,
    images: torch.Tensor,
    sample: Callable[[int, torch.Generator], Episodes],
    n_episodes: int,
    s: Settings,
    g: torch.Generator,
) -> NaiveConv4:
    """Reptile with the naive episode loop; draws episodes and batches in `reptile.meta_train`'s order."""
    theta = net.params()
    done = 0
    while done < n_episodes:
        count = min(n_episodes - done, s.meta_batch)
        eps = sample(count, g)
        x = images[eps.support].float().div_(255)
        batches = inner_batches(eps.support.shape[1], s.inner_steps, s.inner_batch, count, g)
        adapted = [
            naive_episode(net.load(theta), x[j], eps.support_y[j], batches[j], s.lr).params() for j in range(count)
        ]
        theta = {
            k: (1 - s.outer_step) * p + s.outer_step * torch.stack([a[k] for a in adapted]).mean(0)
            for k, p in theta.items()
        }
        done += count
    return net.load(theta)


def naive_evaluate(net: NaiveConv4, images: torch.Tensor, eps: Episodes, s: Settings, g: torch.Generator) -> float:
    """Fine-tune each episode the naive way, then classify its queries (batch statistics of support + queries)."""
    sx, qx = images[eps.support].float().div_(255), images[eps.query].float().div_(255)
    batches = inner_batches(sx.shape[1], s.eval_steps, s.eval_batch, sx.shape[0], g)
    correct = 0.0
    for j in range(sx.shape[0]):
        m = naive_episode(net, sx[j], eps.support_y[j], batches[j], s.lr)
        with torch.no_grad():
            pred = m(torch.cat([sx[j], qx[j]]))[sx.shape[1] :].argmax(-1)
        correct += float((pred == eps.query_y[j]).float().mean())
    return correct / sx.shape[0]


# ---- synthetic data and the two sides of each phase ----


@dataclass
class Setup:
    s: Settings
    device: torch.device
    theta: Theta
    images: torch.Tensor  # uint8 [pool, C, H, W]
    backend: Backend  # the pipeline's choice for this device (FEDMETA_ADAPT)

    @classmethod
    def make(cls, s: Settings) -> Setup:
        g = torch.Generator().manual_seed(s.seed)
        dev = torch.device(s.device)
        theta = {k: v.to(dev) for k, v in model.init_conv4(s.channels, s.width, s.image_size, s.n_way, g).items()}
        # Omniglot-like: mostly white with dark strokes, so 2×2 pooling windows often hold ties
        strokes = torch.rand(512, s.channels, s.image_size // 2, s.image_size // 2, generator=g) < 0.2
        strokes = strokes.repeat_interleave(2, -1).repeat_interleave(2, -2)[..., : s.image_size, : s.image_size]
        images = torch.where(strokes, 0, 255).to(torch.uint8)
        if strokes.shape[-1] < s.image_size:  # odd sizes
            images = F.pad(images, (0, s.image_size - images.shape[-1], 0, s.image_size - images.shape[-2]), value=255)
        return cls(s, dev, theta, images.to(dev), fast.backend(dev))

    def sampler(self, shots: int) -> Callable[[int, torch.Generator], Episodes]:
        def sample(count: int, g: torch.Generator) -> Episodes:
            support = torch.randint(len(self.images), (count, self.s.n_way * shots), generator=g)
            labels = torch.arange(self.s.n_way).repeat_interleave(shots).expand(count, -1).clone()
            return Episodes(support.to(self.device), labels.to(self.device))

        return sample

    def eval_episodes(self, count: int, g: torch.Generator) -> Episodes:
        n = self.s.n_way
        eps = self.sampler(self.s.eval_shots)(count, g)
        query = torch.randint(len(self.images), (count, n), generator=g).to(self.device)
        return Episodes(
            eps.support, eps.support_y, query, torch.arange(n, device=self.device).expand(count, -1).clone()
        )

    def naive_net(self) -> NaiveConv4:
        s = self.s
        return NaiveConv4(s.channels, s.width, s.image_size, s.n_way).to(self.device).load(self.theta)

    def reptile_cfg(self) -> Reptile:
        s = self.s
        return Reptile(n_way=s.n_way, meta_batch=s.meta_batch, inner_steps=s.inner_steps, inner_batch=s.inner_batch)

    def eval_cfg(self) -> Evaluation:
        s = self.s
        return Evaluation(
            n_way=s.n_way, k_shot=s.eval_shots, steps=s.eval_steps, batch=s.eval_batch, lr=s.lr, bn_mode="support"
        )

    # one timed unit of each phase; each returns the number of episodes it ran
    def fedmeta_meta_train(self, g: torch.Generator) -> int:
        n = self.s.meta_batches * self.s.meta_batch
        reptile.meta_train(
            self.theta,
            self.images,
            self.sampler(self.s.train_shots),
            n,
            self.reptile_cfg(),
            self.s.inner_steps,
            self.s.outer_step,
            AdamConfig(lr=self.s.lr),
            g,
            backend=self.backend,
        )
        return n

    def naive_meta_train(self, g: torch.Generator) -> int:
        n = self.s.meta_batches * self.s.meta_batch
        naive_meta_train(self.naive_net(), self.images, self.sampler(self.s.train_shots), n, self.s, g)
        return n

    def fedmeta_evaluation(self, g: torch.Generator) -> int:
        eps = self.eval_episodes(self.s.eval_episodes, g)
        evaluate(
            FineTune(AdamConfig(lr=self.s.lr), "support", self.backend),
            self.theta,
            self.images,
            eps,
            self.eval_cfg(),
            [self.s.eval_steps],
            g,
        )
        return self.s.eval_episodes

    def naive_evaluation(self, g: torch.Generator) -> int:
        eps = self.eval_episodes(self.s.naive_eval_episodes, g)
        naive_evaluate(self.naive_net(), self.images, eps, self.s, g)
        return self.s.naive_eval_episodes


PHASES = ("meta_train", "evaluation")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _warmup_settings(s: Settings) -> Settings:
    """A tiny unit of each phase: first-call costs (imports, oneDNN kernel caches) stay out of the timings."""
    return replace(
        s,
        meta_batches=1,
        inner_steps=1,
        eval_steps=1,
        naive_eval_episodes=1,
        eval_episodes=min(s.eval_episodes, 2 * torch.get_num_threads()),
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _minor_faults() -> int:
    """Page faults of this process so far (all threads): fresh pages that the allocator maps and the kernel zeroes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(setup: Setup, fn: Callable[[torch.Generator], int], seed: int) -> tuple[float, float]:
    """Episodes per second of one call, and its page faults per episode."""
    _sync(setup.device)
    faults, t0 = _minor_faults(), time.perf_counter()
    n = fn(torch.Generator().manual_seed(seed))
    _sync(setup.device)
    return n / (time.perf_counter() - t0), (_minor_faults() - faults) / n


def time_phase(setup: Setup, phase: str) -> dict[str, Any]:
    """Alternate naive and project runs (ABBA), after one warm-up of each; medians and their ratio."""
    naive, ours = getattr(setup, f"naive_{phase}"), getattr(setup, f"fedmeta_{phase}")
    warm = Setup(_warmup_settings(setup.s), setup.device, setup.theta, setup.images, setup.backend)
    getattr(warm, f"naive_{phase}")(torch.Generator().manual_seed(1))
    getattr(warm, f"fedmeta_{phase}")(torch.Generator().manual_seed(1))
    runs: dict[str, list[float]] = {"naive": [], "fedmeta": []}
    faults: dict[str, list[float]] = {"naive": [], "fedmeta": []}
    for r in range(setup.s.repeats):
        order = [("naive", naive), ("fedmeta", ours)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            eps, flt = _timed(setup, fn, setup.s.seed + 100 + r)
            runs[name].append(eps)
            faults[name].append(flt)
            _log(f"{phase} run {r + 1}/{setup.s.repeats}: {name} {eps:.2f} episodes/s, {flt:.0f} page faults/episode")
    naive_eps, our_eps = statistics.median(runs["naive"]), statistics.median(runs["fedmeta"])
    return {
        "naive_eps_per_s": round(naive_eps, 3),
        "fedmeta_eps_per_s": round(our_eps, 3),
        "ratio": round(our_eps / naive_eps, 3),
        "naive_runs_eps_per_s": [round(v, 3) for v in runs["naive"]],
        "fedmeta_runs_eps_per_s": [round(v, 3) for v in runs["fedmeta"]],
        "naive_page_faults_per_episode": round(statistics.median(faults["naive"])),
        "fedmeta_page_faults_per_episode": round(statistics.median(faults["fedmeta"])),
    }


# ---- the FLOP limit: the phases' arithmetic at this machine's fastest float32 rate ----


def flops_per_episode(s: Settings) -> dict[str, int]:
    """Multiply-adds ×2 of the convolutions and the classifier per episode of each phase.

    Training an image costs its forward pass, the weight gradients (as much again) and the input
    gradients of every block but the first (whose input is the image); evaluation adds one forward
    pass per support and query image for the predictions. Batch norm, pooling and Adam are left out:
    they are memory-bound, not arithmetic.
    """
    side, c_in, conv = s.image_size, s.channels, []
    for _ in range(model.BLOCKS):
        conv.append(2 * side * side * c_in * s.width * 9)
        side, c_in = side // 2, s.width
    fc = 2 * s.width * model.feature_size(s.image_size) ** 2 * s.n_way
    forward = sum(conv) + fc
    train = forward + sum(conv) + fc + sum(conv[1:]) + fc
    return {
        "meta_train": s.inner_steps * s.inner_batch * train,
        "evaluation": s.eval_steps * s.eval_batch * train + s.n_way * (s.eval_shots + 1) * forward,
    }


def _best_rate(device: torch.device, work: Callable[[], object], flops: int, seconds: float) -> float:
    """The best of five GFLOP/s rates of `work` (`flops` each call), each timed over `seconds`."""
    work()
    rates = []
    for _ in range(5):
        _sync(device)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            work()
            count += 1
        _sync(device)
        rates.append(flops * count / (time.perf_counter() - t0) / 1e9)
    return max(rates)


def matmul_gflops(device: torch.device, n: int = 1024, seconds: float = 0.3) -> float:
    """The float32 n×n matrix-product rate (GFLOP/s) at the current thread count."""
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(k)).to(device) for k in (0, 1))
    return _best_rate(device, lambda: a @ b, 2 * n**3, seconds)


def conv_gflops(device: torch.device, width: int, side: int, seconds: float = 0.3) -> float:
    """The float32 rate (GFLOP/s) of Conv4's second convolution (3×3, width → width, padding 1, channels
    last), the shape that carries three quarters of a training step's FLOPs: ten images per thread on the
    CPU, as a lane trains, and 400 on a GPU, where ten would leave it idle."""
    g = torch.Generator().manual_seed(2)
    batch = 10 * (torch.get_num_threads() if device.type == "cpu" else 40)
    h = torch.randn(batch, width, side, side, generator=g).to(device, memory_format=torch.channels_last)
    w = torch.randn(width, width, 3, 3, generator=g).to(device)
    return _best_rate(device, lambda: F.conv2d(h, w, padding=1), 2 * batch * side * side * width * width * 9, seconds)


def param_diffs(setup: Setup) -> dict[str, Any]:
    """|θ_naive − θ_fedmeta| over the B episodes of one seeded meta-batch, adapted from the same θ.

    float64 shows that the implementations compute the same function. In float32 (what the pipeline
    runs) each implementation's trajectory strays from the float64 one, because Adam with β1 = 0
    turns round-off in near-zero gradient components into steps of up to lr; `float32_vs_float64`
    gives each one's distance (max and mean over all parameter elements) to the float64 result,
    so the float32 difference between them can be read against it. On the CPU the naive float32 run
    is repeated at another thread count (`naive_float32_other_threads`): its kernels then sum in
    another order, which shows how far the reference strays from itself. Both float32 comparisons
    also give the share of parameter elements that differ by more than 1e-5. On a GPU the project's float64
    result is instead compared with the same computation on the CPU.
    """
    s = setup.s
    g = torch.Generator().manual_seed(s.seed + 7)
    eps = setup.sampler(s.train_shots)(s.meta_batch, g)
    batches = inner_batches(eps.support.shape[1], s.inner_steps, s.inner_batch, s.meta_batch, g)
    adam = AdamConfig(lr=s.lr)
    results: dict[tuple[str, torch.dtype], list[Theta]] = {}

    def diffs(a: list[Theta], b: list[Theta]) -> torch.Tensor:
        return torch.cat(
            [(a[j][k].cpu().double() - b[j][k].cpu().double()).abs().flatten() for j in range(len(a)) for k in a[j]]
        )

    def inputs(dtype: torch.dtype) -> tuple[Theta, torch.Tensor]:
        return {k: v.to(dtype) for k, v in setup.theta.items()}, setup.images[eps.support].to(dtype).div_(255)

    def naive(dtype: torch.dtype) -> list[Theta]:
        theta, x = inputs(dtype)
        net = NaiveConv4(s.channels, s.width, s.image_size, s.n_way).to(setup.device, dtype).load(theta)
        return [naive_episode(net, x[j], eps.support_y[j], batches[j], s.lr).params() for j in range(s.meta_batch)]

    for dtype in (torch.float64, torch.float32):
        results[("naive", dtype)] = naive(dtype)
        theta, x = inputs(dtype)
        for impl in (None, "vmap") if dtype == torch.float32 else (None,):
            backend = fast.backend(setup.device, impl)
            params = reptile.expand(theta, s.meta_batch)
            adapted = reptile.adapt(params, x, eps.support_y, batches, adam, None, backend)[0]
            results[(impl or "fedmeta", dtype)] = [{k: v[j] for k, v in adapted.items()} for j in range(s.meta_batch)]

    truth = results[("fedmeta", torch.float64)]
    extra: dict[str, Any] = {}
    if (
        setup.device.type == "cpu"
    ):  # the reference against itself: its kernels sum in another order on another thread count
        threads = torch.get_num_threads()
        other = 2 if threads == 1 else 1
        torch.set_num_threads(other)
        try:
            again = naive(torch.float32)
        finally:
            torch.set_num_threads(threads)
        self_diff = diffs(results[("naive", torch.float32)], again)
        extra["naive_float32_other_threads"] = {
            "threads": [threads, other],
            "max": float(self_diff.max()),
            "share_above_1e-5": float((self_diff > 1e-5).double().mean()),
        }
    else:  # the same float64 computation on the CPU
        theta = {k: v.to("cpu", torch.float64) for k, v in setup.theta.items()}
        x = setup.images[eps.support].to("cpu", torch.float64).div_(255)
        cpu = fast.backend(torch.device("cpu"))
        y = eps.support_y.cpu()
        adapted = reptile.adapt(reptile.expand(theta, s.meta_batch), x, y, batches, adam, None, cpu)[0]
        on_cpu = [{k: v[j] for k, v in adapted.items()} for j in range(s.meta_batch)]
        extra["max_param_diff_float64_device_vs_cpu"] = float(diffs(truth, on_cpu).max())
    float32 = diffs(results[("fedmeta", torch.float32)], results[("naive", torch.float32)])
    return extra | {
        "max_param_diff_float64": float(diffs(truth, results[("naive", torch.float64)]).max()),
        "max_param_diff_float32": float(float32.max()),
        "share_above_1e-5_float32": float((float32 > 1e-5).double().mean()),
        "float32_vs_float64": {
            name: {"max": float(d.max()), "mean": float(d.mean())}
            for name in ("naive", "fedmeta", "vmap")
            for d in [diffs(results[(name, torch.float32)], truth)]
        },
    }


# ---- memory: one fresh process per side and phase ----


def _maxrss_mb() -> float:
    """This process's peak RSS: VmHWM where /proc has it (ru_maxrss on Linux would include the
    parent's peak, inherited through fork and kept across exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def memory_probe(settings_json: str, side: str, phase: str) -> None:
    """Child-process entry: set up, warm up on a tiny unit (lazy imports, kernel caches), then run one
    unit of `side`'s `phase`; print the process's peak RSS before and after it as JSON."""
    s = Settings(**json.loads(settings_json))
    _configure(s)
    setup = Setup.make(s)
    getattr(Setup(_warmup_settings(s), setup.device, setup.theta, setup.images, setup.backend), f"{side}_{phase}")(
        torch.Generator().manual_seed(1)
    )
    before = _maxrss_mb()
    gpu = setup.device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(setup.device)
    getattr(setup, f"{side}_{phase}")(torch.Generator().manual_seed(s.seed + 100))
    probe = {"before_mb": round(before, 1), "peak_mb": round(_maxrss_mb(), 1)}
    if gpu:
        probe["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(setup.device) / 2**20, 1)
    print(json.dumps(probe))


def peak_rss(s: Settings, which: tuple[tuple[str, str], ...] | None = None) -> dict[str, float]:
    """Per side and phase, from a fresh process each: peak RSS, and its growth during the phase
    (so allocator memory kept from other phases cannot hide or inflate a phase's own); on CUDA also
    the phase's peak of memory allocated on the device."""
    out: dict[str, float] = {}
    for side, phase in which or tuple((side, phase) for phase in PHASES for side in ("naive", "fedmeta")):
        code = (
            "from fedmeta.tools.bench import memory_probe; "
            f"memory_probe({json.dumps(json.dumps(asdict(s)))}, {side!r}, {phase!r})"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {side} {phase} failed:\n{done.stderr[-2000:]}")
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        out[f"{side}_{phase}"] = probe["peak_mb"]
        out[f"{side}_{phase}_growth"] = round(probe["peak_mb"] - probe["before_mb"], 1)
        if "gpu_peak_mb" in probe:
            out[f"{side}_{phase}_gpu"] = probe["gpu_peak_mb"]
    return out


# ---- the command ----


def _configure(s: Settings) -> None:
    if s.threads:
        torch.set_num_threads(s.threads)
    runtime.configure_device(s.device)  # as the stages run: it picks cuDNN's kernels and their precision


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({_cpu_model()}, {os.cpu_count()} cores)"


def _cpu_model() -> str:
    """The CPU's model name and its widest vector ISA: the same model name covers CPUs with and without AVX-512."""
    lines = fast.kernels.cpu().splitlines()
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name}, {isa}" if isa else name


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to in this environment (its verbose `isa:` line) and the kernel it runs for
    Conv4's 64 → 64 convolution, from a fresh process: oneDNN prints them only when it starts verbose."""
    code = (
        "import torch, torch.nn.functional as F; "
        "F.conv2d(torch.randn(10, 64, 14, 14).contiguous(memory_format=torch.channels_last), "
        "torch.randn(64, 64, 3, 3), padding=1)"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "ONEDNN_VERBOSE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = out.splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), "unknown")
    conv = next((line.split(",")[6] for line in lines if ",exec,cpu,convolution," in line), "unknown")
    return f"{isa}; 3×3 64 → 64 convolution: {conv}"


def run(s: Settings) -> dict[str, Any]:
    _configure(s)
    setup = Setup.make(s)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "commit": _commit(),
        "torch": torch.__version__,
        "device": _device_name(setup.device),
        "threads": torch.get_num_threads(),
        "implementation": fast.implementation(setup.device),
        "lanes": lanes.count(s.meta_batch),
        "kernels": kernels.choose().tags(),
        "onednn": onednn_isa(),
        "settings": asdict(s),
    }
    result["matmul_gflops"] = round(matmul_gflops(setup.device), 1)
    result["conv_gflops"] = round(conv_gflops(setup.device, s.width, s.image_size // 2), 1)
    flops = flops_per_episode(s)
    for phase in PHASES:
        result[phase] = time_phase(setup, phase)
        limit = max(result["matmul_gflops"], result["conv_gflops"]) * 1e9 / flops[phase]
        result[phase] |= {
            "gflop_per_episode": round(flops[phase] / 1e9, 3),
            "flop_limit_eps_per_s": round(limit, 2),
            "fedmeta_share_of_limit": round(result[phase]["fedmeta_eps_per_s"] / limit, 3),
        }
    _log("parameter check")
    result.update(param_diffs(setup))
    result["load_average_before_after"] = [round(v, 2) for v in (*load_before, *os.getloadavg())]
    if s.memory:
        _log("memory: one fresh process per side and phase")
        result["peak_rss_mb"] = peak_rss(s)
    return result


def table(r: dict[str, Any]) -> str:
    k = r["kernels"]
    impl = (
        f"lanes ({r['lanes']}), CPU kernels {k['kernels']} ({k['kernels_build']} build)"
        if r["implementation"] == "lanes"
        else r["implementation"]
    )
    lines = [
        f"fedmeta bench — {r['device']}, torch {r['torch']}, {r['threads']} threads, {impl}, commit {r['commit'][:12]}",
        f"kernels: {k['kernels_reason']}",
        f"ATen: {k['aten_cpu_capability']}; oneDNN: {r['onednn']}",
    ]
    lines.append(
        f"{'phase':<12}{'naive eps/s':>14}{'fedmeta eps/s':>16}{'ratio':>9}{'FLOP limit':>12}"
        f"{'faults/ep naive':>17}{'fedmeta':>9}"
    )
    for phase in PHASES:
        p = r[phase]
        lines.append(
            f"{phase:<12}{p['naive_eps_per_s']:>14.2f}{p['fedmeta_eps_per_s']:>16.2f}{p['ratio']:>8.2f}×"
            f"{p['flop_limit_eps_per_s']:>12.2f}"
            f"{p['naive_page_faults_per_episode']:>17}{p['fedmeta_page_faults_per_episode']:>9}"
        )
    lines.append(
        f"FLOP limit: episodes/s at {max(r['matmul_gflops'], r['conv_gflops']):.0f} GFLOP/s, "
        "the faster of this device's float32 rates at "
        f"{r['threads']} threads: 1024² matrix product {r['matmul_gflops']:.0f}, "
        f"Conv4's 3×3 convolution {r['conv_gflops']:.0f} "
        "(direct convolutions' arithmetic; Winograd's needs less)"
    )
    f = r["float32_vs_float64"]
    lines.append(
        f"max |Δθ| vs naive after one meta-batch: float64 {r['max_param_diff_float64']:.2e}, "
        f"float32 {r['max_param_diff_float32']:.2e} "
        f"({100 * r['share_above_1e-5_float32']:.1f} % of the elements above 1e-5)"
    )
    if "naive_float32_other_threads" in r:
        n = r["naive_float32_other_threads"]
        lines.append(
            f"max |Δθ| of the naive float32 meta-batch, {n['threads'][0]} against {n['threads'][1]} threads: "
            f"{n['max']:.2e} "
            f"({100 * n['share_above_1e-5']:.1f} % above 1e-5)"
        )
    if "max_param_diff_float64_device_vs_cpu" in r:
        lines.append(
            "max |Δθ| of the project's float64 meta-batch, this device vs the CPU: "
            f"{r['max_param_diff_float64_device_vs_cpu']:.2e}"
        )
    lines.append(
        "float32 vs the float64 result, max / mean |Δθ|: "
        + ", ".join(f"{k} {v['max']:.1e} / {v['mean']:.1e}" for k, v in f.items())
    )
    if "peak_rss_mb" in r:
        m = r["peak_rss_mb"]
        lines.append(
            "peak RSS MB (growth during the phase): "
            + ", ".join(f"{k} {m[k]:.0f} (+{m[k + '_growth']:.0f})" for k in m if k + "_growth" in m)
        )
        if any(k.endswith("_gpu") for k in m):
            lines.append(
                "peak GPU memory allocated MB: " + ", ".join(f"{k[:-4]} {m[k]:.0f}" for k in m if k.endswith("_gpu"))
            )
    lines.append(f"load average before/after: {r['load_average_before_after']}")
    return "\n".join(lines)


def main(s: Settings, out: Path) -> dict[str, Any]:
    from fedmeta.atomic import write_text

    result = run(s)
    write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table(result))
    return result
