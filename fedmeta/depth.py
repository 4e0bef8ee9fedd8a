"""The attacker's depth sweep: what changes when the attacker trains longer, up to the paper's 50,000 episodes.

Every number of the quick and long profiles comes from an attacker of 50 episodes × 2 inner epochs; the paper's
trains 50,000 × 50. `scripts/depth.sh` queues one DVC experiment per attacker (the long profile: quick's pretrained
models, Experiment 1 over the paper's 50 rounds). This module copies the finished ones into one folder per run,
`metrics/depth/<run>/` (the layout of `metrics/seeds/<profile>/seed_<n>/`), and states, run by run, where the
backdoor sits after the attack, what is left of it after 50 benign rounds, and what the defense costs, so that
each of the report's disagreements with the paper can be set against the attacker's depth.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedmeta import figures, report, runtime, seed_runs, seeds
from fedmeta.atomic import write_text
from fedmeta.errors import FedmetaError
from fedmeta.scenarios import SCENARIOS

PREFIX = "depth-"  # the DVC experiments scripts/depth.sh queues: depth-<run>[-<part>]
PARTS = ("-attack", "-exp1")  # experiments that ran a run's first stages only, the least complete first
# What each part's stages wrote; the rest of its metrics/ is the baseline commit's, not this run's.
WROTE = {"-attack": ("attack_", "positions_"), "-exp1": ("attack_", "positions_", "exp1_"), "": ("",)}
Rows = list[dict[str, Any]]


# --- collecting runs ----------------------------------------------------------------------------------------


def experiments(repo: Path) -> dict[str, str]:
    """Every depth experiment's run label → the git ref of its most complete part (each part's stages include
    the previous part's, which it reuses from DVC's run cache)."""
    refs = seed_runs._git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    best: dict[str, tuple[int, str]] = {}
    for ref in refs:
        name = ref.rsplit("/", 1)[-1]
        if ref.startswith("refs/exps/exec/") or not name.startswith(PREFIX):
            continue
        label, rank = name.removeprefix(PREFIX), len(PARTS)
        for i, part in enumerate(PARTS):
            if label.endswith(part):
                label, rank = label.removesuffix(part), i
        if rank >= best.get(label, (-1, ""))[0]:
            best[label] = (rank, ref)
    return {label: ref for label, (_, ref) in best.items()}


def part_of(ref: str) -> str:
    """The part an experiment ref ran: one of PARTS, or "" for all of a run's stages."""
    name = ref.rsplit("/", 1)[-1]
    return next((p for p in PARTS if name.endswith(p)), "")


def collect(repo: Path, out: Path, names: list[str] | None = None) -> list[str]:
    """Copy the named depth experiments (default: all that exist) into `out`/<run>/, replacing those runs'
    folders and keeping the others; nothing is written unless every named experiment is found."""
    found = experiments(repo)
    wanted = names if names else sorted(found)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise FedmetaError(
            f"--run {missing[0]}: no DVC experiment depth-{missing[0]}[-attack|-exp1]; "
            f"found: {', '.join(sorted(found)) or 'none'} (see `dvc exp list`)"
        )
    for label in wanted:
        wrote = WROTE[part_of(found[label])]
        files = {
            rel: data
            for rel, data in seed_runs.snapshot(repo, found[label]).items()
            if rel == "params.yaml" or rel.removeprefix("metrics/").startswith(wrote)
        }
        if "params.yaml" not in files or not any(rel.startswith("metrics/attack_") for rel in files):
            raise FedmetaError(f"depth-{label}: no params.yaml and attack metrics there; did it finish?")
        tmp = out / f".{label}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, data in files.items():
            dst = tmp / rel.removeprefix("metrics/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
        shutil.rmtree(out / label, ignore_errors=True)
        tmp.rename(out / label)
    return wanted


# --- one run ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attacker:
    """What sets an attacker's depth, read from its run's params.yaml."""

    episodes: int
    epochs: int
    target_output: str  # fixed (the paper's) or random
    seed: int
    continuation: tuple[float, float]  # Experiment 1's ε and η

    @property
    def paper_lr(self) -> bool:
        return self.continuation == (0.1, 0.001)


@dataclass(frozen=True)
class DepthRun:
    """One run's measurements; each part is empty where its stages did not run."""

    label: str
    attacker: Attacker
    n_way: int
    attack: dict[str, dict[str, dict[str, float]]]  # scenario → before / after
    positions: dict[str, dict[str, dict[str, dict[str, float]]]]  # scenario → model → position
    exp1: dict[str, Rows]  # scenario → rounds
    exp2: dict[str, Rows]  # scenario → steps, mean over benign users
    exp3: dict[str, Rows]


def _json(folder: Path, name: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for v in ("exclude", "include"):
        path = folder / f"{name}_{v}.json"
        merged |= json.loads(path.read_text()) if path.is_file() else {}
    return merged


def load(folder: Path) -> DepthRun:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    b = params["profiles"][params["profile"]]
    attacker = Attacker(
        episodes=b["attack_episodes"],
        epochs=b["attack_inner_epochs"],
        target_output=params["attack"]["target_output"],
        seed=params["seed"],
        continuation=(
            b.get("continuation_outer_step") or b["outer_step"],
            b.get("continuation_inner_lr") or b["inner_lr"],
        ),
    )

    def curves(stage: str) -> dict[str, Rows]:
        out = {}
        for s, sc in SCENARIOS.items():
            paths = sorted((folder / f"{stage}_{sc.variant}").glob(f"{s}_user*.csv"))
            if paths:
                out[s] = seeds.user_mean([runtime.read_csv(p) for p in paths])
        return out

    exp1 = {
        s: runtime.read_csv(p) for s, sc in SCENARIOS.items() if (p := folder / f"exp1_{sc.variant}/{s}.csv").is_file()
    }
    return DepthRun(
        label=folder.name,
        attacker=attacker,
        n_way=params["evaluation"]["n_way"],
        attack=_json(folder, "attack"),
        positions=_json(folder, "positions"),
        exp1=exp1,
        exp2=curves("finetune"),
        exp3=curves("defend"),
    )


def load_all(out: Path) -> list[DepthRun]:
    runs = [load(d) for d in sorted(out.iterdir()) if d.is_dir() and (d / "params.yaml").is_file()]
    if not runs:
        raise FedmetaError(f"{out}: no run folders; collect runs first (fedmeta depth {out})")
    a = lambda r: r.attacker  # noqa: E731
    return sorted(runs, key=lambda r: (a(r).target_output, a(r).paper_lr, a(r).seed, a(r).episodes * a(r).epochs))


# --- the report ---------------------------------------------------------------------------------------------


def _pct(row: dict[str, float] | None, key: str = "attack_train") -> str:
    if row is None:
        return "—"
    half = row.get(f"{key}_ci95")
    return report.pct(row[key]) + ("" if half is None else f" ± {report.pct(half)}")


def _describe(r: DepthRun) -> str:
    a = r.attacker
    extra = [f"seed {a.seed}"] if a.seed else []
    extra += ["continuation ε = 0.1, η = 0.001"] if a.paper_lr else []
    return f"{a.episodes:,} × {a.epochs}, {a.target_output}" + (f" ({', '.join(extra)})" if extra else "")


def after_attack_table(runs: list[DepthRun]) -> str:
    """Where the backdoor sits after the attack round: at output N − 1 (where the paper's attacker trains the
    target), at a random output (a user's own label order), and the range over the other outputs."""
    lines = [
        "| attacker (episodes × epochs, target) | scenario | at output N−1: train / val | at a random output: "
        "train / val | other outputs (train, min – max) | meta-test | main task |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = f"output_{r.n_way - 1}"
        for s in sorted(r.positions):
            at = r.positions[s]["attacked"]
            others = [at[f"output_{k}"]["attack_train"] for k in range(r.n_way - 1) if f"output_{k}" in at]
            after = r.attack[s]["after"]
            lines.append(
                f"| {_describe(r)} | {s} | {_pct(at[last])} / {_pct(at[last], 'attack_val')} "
                f"| {_pct(at['random'])} / {_pct(at['random'], 'attack_val')} "
                f"| {f'{report.pct(min(others))} – {report.pct(max(others))}' if others else '—'} "
                f"| {_pct(after, 'meta_test')} | {_pct(after, 'main')} |"
            )
    return "\n".join(lines)


def persistence_table(runs: list[DepthRun], paper: report.PaperNumbers) -> str:
    """Experiment 1: backdoor accuracy after the attack and after the last benign round, beside the paper's."""
    lines = [
        "| attacker | scenario | after the attack: train / val | after round R: train / val | R "
        f"| paper after {paper.continuation_rounds} rounds |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        for s in sorted(r.exp1):
            after, last = r.exp1[s][1], r.exp1[s][-1]
            _, (ca, cv) = paper.exp1[s]
            lines.append(
                f"| {_describe(r)} | {s} | {_pct(after)} / {_pct(after, 'attack_val')} "
                f"| {_pct(last)} / {_pct(last, 'attack_val')} | {int(last['round']) - 1} | ≈ {ca} / {cv} |"
            )
    return "\n".join(lines)


def defense_table(runs: list[DepthRun], paper: report.PaperNumbers) -> str:
    """Experiments 2 and 3 at their last step, means over the benign users: the backdoor without and with the
    matching-network defense, and the defense's meta-test price."""
    lines = [
        "| attacker | scenario | steps | Exp 2 backdoor (train) | Exp 3 backdoor (train) | Exp 2 meta-test "
        f"| Exp 3 meta-test (paper {paper.exp3_meta_test}) | price (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for s in sorted(set(r.exp2) & set(r.exp3)):
            e2, e3 = r.exp2[s][-1], r.exp3[s][-1]
            lines.append(
                f"| {_describe(r)} | {s} | {int(e2['step'])} | {report.pct(e2['attack_train'])} "
                f"| {report.pct(e3['attack_train'])} | {report.pct(e2['meta_test'])} | {report.pct(e3['meta_test'])} "
                f"| {100 * (e2['meta_test'] - e3['meta_test']):.1f} |"
            )
    return "\n".join(lines)


def _or_pending(table: str, option: str) -> str:
    """A table, or what to run where no run here has reached its stages yet."""
    if table.count("\n") > 1:
        return table
    return f"No run here has finished these stages yet: `bash scripts/depth.sh {option + ' ' if option else ''}RUN`."


def _by_depth(runs: list[DepthRun], value: Any) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Series for a figure: one per (target output, epochs), seed-0 runs at the continuation's own ε and η only;
    x = attacker episodes, y = value(run, scenario) where it is measured."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in runs:
        a = r.attacker
        if a.seed != 0 or a.paper_lr:
            continue
        for s in SCENARIOS:
            y = value(r, s)
            if y is not None:
                label = f"{a.target_output} attacker, × {a.epochs} epochs"
                out.setdefault(label, {}).setdefault(s, []).append((a.episodes, y))
    return {k: {s: sorted(v) for s, v in series.items()} for k, series in out.items()}


def _position(r: DepthRun, s: str, key: str) -> float | None:
    return r.positions[s]["attacked"][key]["attack_train"] if s in r.positions else None


def write(out: Path) -> list[Path]:
    """report.md and three figures from `out`/<run>/."""
    runs = load_all(out)
    paper = report.PAPER["omniglot"]
    last = lambda r: f"output_{r.n_way - 1}"  # noqa: E731
    paths = [
        figures.against_depth(
            {
                **{f"{k}, at output N−1": v for k, v in _by_depth(runs, lambda r, s: _position(r, s, last(r))).items()},
                **{
                    f"{k}, at a random output": v
                    for k, v in _by_depth(runs, lambda r, s: _position(r, s, "random")).items()
                },
            },
            {s: paper.exp1[s][0][0] / 100 for s in SCENARIOS},
            "backdoor accuracy (attack train) after the attack",
            out / "backdoor_after_attack.png",
            1 / runs[0].n_way,
        ),
        figures.against_depth(
            _by_depth(runs, lambda r, s: r.exp1[s][-1]["attack_train"] if s in r.exp1 else None),
            {s: paper.exp1[s][1][0] / 100 for s in SCENARIOS},
            "backdoor accuracy (attack train) after 50 benign rounds",
            out / "backdoor_after_50_rounds.png",
            1 / runs[0].n_way,
        ),
        figures.against_depth(
            _by_depth(
                runs,
                lambda r, s: (
                    r.exp2[s][-1]["meta_test"] - r.exp3[s][-1]["meta_test"] if s in r.exp2 and s in r.exp3 else None
                ),
            ),
            {},
            "the defense's meta-test price (Exp 2 − Exp 3, points / 100)",
            out / "defense_price.png",
        ),
    ]
    complete = [r for r in runs if r.exp1 and r.exp2 and r.exp3 and r.positions]
    deepest = [
        r for r in complete if (r.attacker.episodes, r.attacker.epochs, r.attacker.target_output) == (50000, 2, "fixed")
    ]
    deepest = [r for r in deepest if not r.attacker.paper_lr]
    sections = [
        "# The attacker's depth",
        "Written by `fedmeta depth` from the runs in this folder (`bash scripts/depth.sh` queues them). Every run "
        "starts from the quick profile's pretrained models (seed 0 unless named; 6 rounds, ε = 1, η = 0.003) and "
        "runs the long profile's horizons: Experiment 1 over 50 benign rounds, measured every 5. The attacker's own "
        "Reptile uses the profile's ε = 1 and `attack.lr` = 0.001, the paper's η; its depth is `attack_episodes` × "
        "`attack_inner_epochs` (the paper's: 50,000 × 50). Accuracies in %, ± the run's 95 % interval over its "
        f"{yaml.safe_load((out / runs[0].label / 'params.yaml').read_text())['profiles']['long']['eval_episodes']} "
        "evaluation episodes; Experiments 2 and 3 average the three benign users.",
        "## After the attack: where the backdoor sits",
        after_attack_table(runs),
        "## Experiment 1: after 50 benign rounds",
        _or_pending(persistence_table(runs, paper), "--exp1"),
        "## Experiments 2 and 3: fine-tuning and the defense",
        _or_pending(defense_table(runs, paper), ""),
    ]
    if len(deepest) > 1:
        folders = [out / r.label for r in deepest]
        _, table = seeds.summarize([seeds.load(f) for f in folders])
        sections += [f"## The deepest fixed attacker across seeds ({len(deepest)} seeds)", table]
    sections += ["## Figures", *(f"![{p.stem}]({p.name})" for p in paths)]
    write_text(out / "report.md", "\n\n".join(sections) + "\n")
    return paths + [out / "report.md"]


def run_label(name: str) -> str:
    """A --run value as given or as its experiment's name."""
    return re.sub(f"^{PREFIX}", "", name)
