"""Collecting runs for the findings across seeds (`fedmeta.seeds`): the metric files of runs that differ only in
their seed, from the workspace and from DVC experiments (`dvc exp run --queue -S seed=1`), copied into one folder
per seed, so the summary can be redrawn from git without the experiments.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from fedmeta.errors import FedmetaError
from fedmeta.scenarios import VARIANTS

# What a seed's folder holds, relative to metrics/: the paper's stages' results (positions only where it ran).
PER_VARIANT = ("attack_{v}.json", "positions_{v}.json", "exp1_{v}/", "finetune_{v}/", "defend_{v}/")


def experiment_ref(repo: Path, name: str) -> str:
    """The git ref DVC keeps experiment `name` under (refs/exps/<baseline>/<name>)."""
    out = _git(repo, "for-each-ref", "--format=%(refname)", "refs/exps")
    refs = [r for r in out.split() if r.rsplit("/", 1)[-1] == name and not r.startswith("refs/exps/exec/")]
    if not refs:
        raise FedmetaError(f"--exp {name}: no DVC experiment has that name (see `dvc exp list --all-commits`)")
    if len(refs) > 1:
        raise FedmetaError(f"--exp {name}: {len(refs)} DVC experiments have that name; `dvc exp remove` the others")
    return refs[0]


def _git(repo: Path, *args: str) -> str:
    return _git_bytes(repo, *args).decode()


def _git_bytes(repo: Path, *args: str) -> bytes:
    """git's output; its failure (outside a repository, an unknown ref) in one line."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {done.returncode}"]
        if "not a git repository" in why[0]:
            raise FedmetaError(f"{repo}: not a git repository; --exp reads DVC experiments from git (run from one)")
        raise FedmetaError(f"git {args[0]} in {repo}: {why[0]}")
    return done.stdout


def _wanted(rel: str) -> bool:
    if rel == "params.yaml":
        return True
    names = [p.format(v=v) for p in PER_VARIANT for v in VARIANTS]
    inside = rel.removeprefix("metrics/")
    return rel.startswith("metrics/") and any(inside == n or (n.endswith("/") and inside.startswith(n)) for n in names)


def snapshot(repo: Path, ref: str | None) -> dict[str, bytes]:
    """params.yaml and the paper's stages' metric files of the workspace (ref None) or of a git ref."""
    if ref is None:
        paths = [str(p.relative_to(repo)) for p in [repo / "params.yaml", *(repo / "metrics").rglob("*")]]
        return {rel: (repo / rel).read_bytes() for rel in paths if (repo / rel).is_file() and _wanted(rel)}
    listed = _git(repo, "ls-tree", "-r", "--name-only", ref, "--", "params.yaml", "metrics").split()
    return {rel: _git_bytes(repo, "show", f"{ref}:{rel}") for rel in listed if _wanted(rel)}


def _differs(a: Any, b: Any, path: str = "") -> str | None:
    """The first dotted key where two parameter trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _differs(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    return None if a == b else path


def collect(repo: Path, sources: list[tuple[str, str | None]], out: Path) -> None:
    """Copy each source's (label, git ref or None for the workspace) metrics into `out`/seed_<seed>/, replacing
    that seed's folder and keeping the others. Refused, with nothing written, unless all runs differ in their
    seed only and each source brings a seed of its own."""
    runs: dict[int, dict[str, bytes]] = {}
    labels: dict[int, str] = {}
    for label, ref in sources:
        files = snapshot(repo, ref)
        if "params.yaml" not in files or not any(r.startswith("metrics/attack_") for r in files):
            raise FedmetaError(f"{label}: no params.yaml and attack metrics there; run the pipeline first")
        seed = yaml.safe_load(files["params.yaml"]).get("seed")
        if not isinstance(seed, int):
            raise FedmetaError(f"{label}: params.yaml seed must be an integer, found {seed!r}")
        if seed in runs:
            raise FedmetaError(f"{label}: seed {seed} is already collected from {labels[seed]}; each seed once")
        runs[seed], labels[seed] = files, label
    kept = {
        int(d.name.removeprefix("seed_")): d
        for d in (out.glob("seed_*") if out.is_dir() else [])
        if d.name.removeprefix("seed_").isdigit() and int(d.name.removeprefix("seed_")) not in runs
    }
    every = [(labels[k], yaml.safe_load(f["params.yaml"])) for k, f in runs.items()]
    every += [(str(d), yaml.safe_load((d / "params.yaml").read_text())) for d in kept.values()]
    first_label, first = every[0][0], {k: v for k, v in every[0][1].items() if k != "seed"}
    for label, params in every[1:]:
        if key := _differs(first, {k: v for k, v in params.items() if k != "seed"}):
            raise FedmetaError(f"{label}: parameter {key} differs from {first_label}'s; runs may differ in seed only")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for seed, folder in kept.items():
        shutil.copytree(folder, tmp / f"seed_{seed}")
    for seed, files in runs.items():
        for rel, data in files.items():
            dst = tmp / f"seed_{seed}" / rel.removeprefix("metrics/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
