"""Findings across seeds: the paper's claims, measured in runs that differ only in their seed.

A run's 95 % intervals cover the episodes it drew, not the run: the users' classes, the attacker's episodes and
float32 round-off all move with the seed. So each claim is stated per seed, then as the mean over seeds with a
Student-t interval and the range, and marked where it does not hold in every seed. `fedmeta.seed_runs` collects
the runs, one folder per seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy import stats

from fedmeta import figures, report, runtime
from fedmeta.atomic import write_text
from fedmeta.errors import FedmetaError
from fedmeta.scenarios import SCENARIOS, VARIANTS

# --- one seed's results -------------------------------------------------------------------------------------


Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class SeedRun:
    """One seed's results, as the paper's stages wrote them."""

    seed: int
    params: dict[str, Any]
    attack: dict[str, dict[str, dict[str, float]]]  # scenario → before / after → accuracies
    exp1: dict[str, Rows]  # scenario → rounds
    exp2: dict[str, list[Rows]]  # scenario → per benign user, fine-tuning steps
    exp3: dict[str, list[Rows]]
    positions: dict[str, dict[str, dict[str, dict[str, float]]]]  # scenario → model → position; {} if not run

    @property
    def chance(self) -> float:
        return 1 / self.params["evaluation"]["n_way"]


def load(folder: Path) -> SeedRun:
    def users(stage: str, s: str) -> list[Rows]:
        paths = sorted((folder / f"{stage}_{SCENARIOS[s].variant}").glob(f"{s}_user*.csv"))
        return [runtime.read_csv(p) for p in paths]

    def scenario_json(name: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for v in VARIANTS:
            path = folder / f"{name}_{v}.json"
            merged |= runtime.read_json(path) if path.is_file() else {}
        return merged

    params = yaml.safe_load((folder / "params.yaml").read_text())
    return SeedRun(
        seed=params["seed"],
        params=params,
        attack=scenario_json("attack"),
        exp1={s: runtime.read_csv(folder / f"exp1_{sc.variant}" / f"{s}.csv") for s, sc in SCENARIOS.items()},
        exp2={s: users("finetune", s) for s in SCENARIOS},
        exp3={s: users("defend", s) for s in SCENARIOS},
        positions=scenario_json("positions"),
    )


def load_all(out: Path) -> list[SeedRun]:
    runs = sorted((load(d) for d in out.glob("seed_*") if d.is_dir()), key=lambda r: r.seed)
    if not runs:
        raise FedmetaError(f"{out}: no seed_<n>/ folders; collect runs first (fedmeta seeds --exp NAME)")
    return runs


def user_mean(curves: list[Rows]) -> Rows:
    """A scenario's curve averaged over its benign users, point by point (they share the recorded steps)."""
    return [{k: sum(c[i][k] for c in curves) / len(curves) for k in curves[0][i]} for i in range(len(curves[0]))]


# --- claims -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims in one scenario: the quantity measured per seed (a fraction, or points of
    accuracy for a difference), its mean within-run 95 % half-width, and whether the claim holds in that seed."""

    text: str
    scenario: str
    measure: Callable[[SeedRun], tuple[float, float]]
    holds: Callable[[SeedRun], bool]
    unit: str = "%"


def _above(x: dict[str, float], y: dict[str, float], key: str = "attack_train") -> bool:
    """x's accuracy above y's, beyond both 95 % intervals."""
    return x[key] - x[f"{key}_ci95"] > y[key] + y[f"{key}_ci95"]


def _point(row: dict[str, float], key: str = "attack_train") -> tuple[float, float]:
    return row[key], row[f"{key}_ci95"]


def _kept(run: SeedRun, s: str) -> float:
    """Experiment 1: the share of its after-attack backdoor accuracy a scenario keeps after the last round."""
    return run.exp1[s][-1]["attack_train"] / max(run.attack[s]["after"]["attack_train"], 1e-9)


def _cost(run: SeedRun, s: str) -> float:
    """The defense's price: meta-test accuracy of plain fine-tuning minus the defense's, at the last step."""
    return user_mean(run.exp2[s])[-1]["meta_test"] - user_mean(run.exp3[s])[-1]["meta_test"]


def claims() -> list[Claim]:
    """The claims the report draws, by scenario."""
    out: list[Claim] = []
    for s in sorted(SCENARIOS):
        out += [
            Claim(
                "the attack succeeds in one shot: backdoor accuracy (attack train) after the attack, "
                "above the pretrained model's",
                s,
                lambda r, s=s: _point(r.attack[s]["after"]),
                lambda r, s=s: _above(r.attack[s]["after"], r.attack[s]["before"]),
            ),
            Claim(
                "it persists through benign meta-training: after Experiment 1's last round, above the pretrained's",
                s,
                lambda r, s=s: _point(r.exp1[s][-1]),
                lambda r, s=s: _above(r.exp1[s][-1], r.attack[s]["before"]),
            ),
            Claim(
                "it persists through benign fine-tuning: after Experiment 2's last step (mean over users), "
                "above the pretrained's",
                s,
                lambda r, s=s: _point(user_mean(r.exp2[s])[-1]),
                lambda r, s=s: _above(user_mean(r.exp2[s])[-1], r.attack[s]["before"]),
            ),
            Claim(
                "the defense reaches chance: Experiment 3's last step (mean over users), within its interval of 1/N",
                s,
                lambda r, s=s: _point(user_mean(r.exp3[s])[-1]),
                lambda r, s=s: (lambda p: p["attack_train"] - p["attack_train_ci95"] <= r.chance)(
                    user_mean(r.exp3[s])[-1]
                ),
            ),
            Claim(
                "the backdoor lives at the attacker's output: with the target at a random output it is within "
                "its interval of chance",
                s,
                lambda r, s=s: _point(r.positions[s]["attacked"]["random"]),
                lambda r, s=s: (lambda p: p["attack_train"] - p["attack_train_ci95"] <= r.chance)(
                    r.positions[s]["attacked"]["random"]
                ),
            ),
        ]
    for s in ("a", "b"):  # meta-test accuracy depends on the model only: (b) and (c) share theirs
        out.append(
            Claim(
                "the defense costs meta-test accuracy: Experiment 2's minus Experiment 3's at the last step"
                + (" (one model for b and c)" if s == "b" else ""),
                s,
                lambda r, s=s: (_cost(r, s), math.nan),
                lambda r, s=s: _cost(r, s) > 0,
                unit="points",
            )
        )
    out.append(
        Claim(
            "(c) fades fastest: after Experiment 1's last round it keeps a smaller share of its after-attack "
            "backdoor accuracy than (a) and (b)",
            "c",
            lambda r: (_kept(r, "c"), math.nan),
            lambda r: _kept(r, "c") < min(_kept(r, "a"), _kept(r, "b")),
            unit="% kept",
        )
    )
    return sorted(out, key=lambda c: c.scenario)


def across(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, the half-width of its Student-t 95 % interval over seeds (nan for one seed), min and max."""
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, math.nan, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), min(values), max(values)


def _fmt(x: float) -> str:
    """A fraction in %, or a difference of fractions in points."""
    return "—" if math.isnan(x) else f"{100 * x:.1f}"


def summarize(runs: list[SeedRun]) -> tuple[list[dict[str, Any]], str]:
    """Per claim: the per-seed values, the across-seed statistics, and in how many seeds it holds; and the
    markdown table of them."""
    rows, n = [], len(runs)
    positions = all(r.positions for r in runs)
    lines = [
        f"| scenario | claim | per seed ({', '.join(str(r.seed) for r in runs)}) | mean ± 95 % over seeds "
        "| range | mean within-run ± | holds in |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in claims():
        if "random output" in c.text and not positions:
            continue
        measured = [c.measure(r) for r in runs]
        values = [v for v, _ in measured]
        mean, half, lo, hi = across(values)
        within = [w for _, w in measured if not math.isnan(w)]
        held = [c.holds(r) for r in runs]
        rows.append(
            {
                "claim": c.text,
                "scenario": c.scenario,
                "unit": c.unit,
                "per_seed": dict(zip((r.seed for r in runs), values)),
                "mean": mean,
                "ci95_across_seeds": half,
                "min": lo,
                "max": hi,
                "holds": dict(zip((r.seed for r in runs), held)),
            }
        )
        mark = f"{sum(held)} / {n}" + ("" if all(held) else " **not every seed**")
        lines.append(
            f"| {c.scenario} | {c.text} ({c.unit}) | {', '.join(_fmt(v) for v in values)} "
            f"| {_fmt(mean)} ± {_fmt(half)} | {_fmt(lo)} – {_fmt(hi)} "
            f"| {_fmt(sum(within) / len(within)) if within else '—'} | {mark} |"
        )
    return rows, "\n".join(lines)


def horizons(runs: list[SeedRun], paper: report.PaperNumbers) -> str:
    """The paper's statements at its horizons (50 rounds, 500 steps) beside this profile's last points, mean over
    seeds: Experiment 1's final backdoor accuracy; Experiment 2 from the evaluation's own step count on (its step
    0 is the model before any fine-tuning); the first step at which the defense is within its interval of
    chance, and its final meta-test accuracy."""

    def mean(values: list[float]) -> str:
        return report.pct(sum(values) / len(values))

    def first_chance(r: SeedRun, s: str) -> float:
        curve = user_mean(r.exp3[s])
        hit = [p["step"] for p in curve if p["attack_train"] - p["attack_train_ci95"] <= r.chance]
        return hit[0] if hit else math.nan

    b = runs[0].params["profiles"][runs[0].params["profile"]]
    steps = runs[0].params["evaluation"]["steps"]  # Experiment 2 from the point every other measurement uses
    lines = [
        f"| scenario | paper: after {paper.continuation_rounds} rounds (train / val) "
        f"| ours: after {b['continuation_rounds']} rounds | paper: Exp 2 over 500 steps "
        f"| ours: Exp 2 step {steps} → {b['finetune_steps']} | paper: Exp 3 | ours: Exp 3 first step at chance "
        "(per seed), final meta-test |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sorted(SCENARIOS):
        _, (ca, cv) = paper.exp1[s]
        firsts = ", ".join("never" if math.isnan(x) else str(int(x)) for x in (first_chance(r, s) for r in runs))
        exp1 = [r.exp1[s][-1] for r in runs]
        exp2 = [[p for p in c if p["step"] >= min(steps, c[-1]["step"])] for c in (user_mean(r.exp2[s]) for r in runs)]
        exp3 = [user_mean(r.exp3[s])[-1] for r in runs]
        lines.append(
            f"| {s} | {ca} / {cv} | {mean([p['attack_train'] for p in exp1])} / "
            f"{mean([p['attack_val'] for p in exp1])} "
            f"| {paper.exp2[s]} | {mean([c[0]['attack_train'] for c in exp2])} → "
            f"{mean([c[-1]['attack_train'] for c in exp2])} "
            f"| {paper.exp3[s]} within a few epochs (meta-test {paper.exp3_meta_test}) "
            f"| {firsts}; {mean([p['meta_test'] for p in exp3])} |"
        )
    return "\n".join(lines)


def write(out: Path) -> list[Path]:
    """summary.json, report.md and Figs. 3, 5 and 7 with bands over the seeds, from `out`/seed_*/."""
    runs = load_all(out)
    params = runs[0].params
    rows, table = summarize(runs)
    dataset, profile = params["dataset"], params["profile"]
    seeds = ", ".join(str(r.seed) for r in runs)
    curves = {
        "exp1": {s: [r.exp1[s] for r in runs] for s in SCENARIOS},
        "exp2": {s: [user_mean(r.exp2[s]) for r in runs] for s in SCENARIOS},
        "exp3": {s: [user_mean(r.exp3[s]) for r in runs] for s in SCENARIOS},
    }
    paths = [
        figures.across_seeds(curves[f], "round" if f == "exp1" else "step", out / f"{f}_{dataset}.png", f, dataset)
        for f in curves
    ]
    runtime.write_json(out / "summary.json", {"profile": profile, "seeds": [r.seed for r in runs], "claims": rows})
    text = "\n\n".join(
        [
            f"# Across seeds (profile `{profile}`, dataset `{dataset}`, seeds {seeds})",
            "Written by `fedmeta seeds` from the runs in `seed_*/`, which differ only in `seed`. Backdoor accuracy "
            "on the attack-training set, in %; 'above' and 'within' compare 95 % intervals of the run's episodes. "
            f"'mean ± 95 % over seeds' is a Student-t interval over the {len(runs)} seeds; a claim that fails in "
            "any seed is marked.",
            "## The paper's claims",
            table,
            "## The paper's horizons",
            "Means over seeds; the paper's statements are for its own budgets (Sec. 4).",
            horizons(runs, report.PAPER[dataset]),
            "## Figures",
            "Lines: mean over seeds; bands: the range over seeds. Experiments 2 and 3 average the benign users.",
            *(f"![{p.stem}]({p.name})" for p in paths),
        ]
    )
    write_text(out / "report.md", text + "\n")
    return paths + [out / "report.md", out / "summary.json"]
