"""dvc.yaml's code dependencies are exactly the code each stage imports, so a code change reruns
every stage whose outputs it can change (a missing dependency means stale cached results) and no other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# File writing, error messages and MLflow logging cannot change what a stage computes.
NEVER_CHANGE_OUTPUTS = {"fedmeta/atomic.py", "fedmeta/errors.py", "fedmeta/tracking.py"}
# Building the dataset: after `prepare` it reaches a stage through data/prepared/dataset.pt.
DATASET_BUILDING = {"fedmeta/key.py", "fedmeta/data"}
MODULE_OF = {"continue": "continue_training", "exp4-report": "exp4_report"}  # `fedmeta <command>` → its module
PIPELINES = ("dvc.yaml", "experiment4/dvc.yaml")  # the paper's, and Experiment 4's (its stages run at the root)
STAGES = {
    f"{path}:{name}": stage
    for path in PIPELINES
    for name, stage in yaml.safe_load((ROOT / path).read_text())["stages"].items()
}


def _module_path(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if path.is_dir() and (path / "__init__.py").exists():
        return path
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def _imports(path: Path) -> set[Path]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] in ("fedmeta", "stages") and name not in ("fedmeta", "stages"):
                module = _module_path(name)
                if module is not None:
                    found.add(module)
    return found


def code_closure(start: Path) -> set[str]:
    """Repo-relative files of every project module `start` imports, directly or not (packages as folders)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            todo.extend(_imports(file))
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _covered(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_its_imports(name: str) -> None:
    stage = STAGES[name].get("do", STAGES[name])
    command = stage["cmd"].split()[1]
    module = ROOT / "stages" / f"{MODULE_OF.get(command, command)}.py"
    deps = {d for d in stage["deps"] if d.startswith(("fedmeta", "stages"))}
    exempt = NEVER_CHANGE_OUTPUTS | (DATASET_BUILDING if "data/prepared/dataset.pt" in stage["deps"] else set())
    needed = {f for f in code_closure(module) if not any(_covered(e, f) for e in exempt)}
    missing = sorted(f for f in needed if not any(_covered(d, f) for d in deps))
    unused = sorted(d for d in deps if not any(_covered(d, f) for f in needed))
    assert not missing and not unused, f"stage {name}: missing deps {missing}, deps it does not import {unused}"
