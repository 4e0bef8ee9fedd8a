"""Bad input: one line naming the culprit, a non-zero exit, and no output written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_raw
from fedmeta import config
from fedmeta.errors import FedmetaError


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("DVC_ROOT", None)
    return subprocess.run([sys.executable, "-m", "fedmeta", *args], cwd=cwd, env=env, capture_output=True, text=True)


def workdir(tmp_path: Path, raw: dict) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def outputs(cwd: Path) -> set[str]:
    return {str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file() and p.name not in ("params.yaml", "mlflow.db")}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda r: r.update(sedd=1), "sedd"),
        (lambda r: r["reptile"].update(n_way="five"), "reptile.n_way"),
        (lambda r: r["attack"].update(boost=-1.0), "attack.boost"),
        (lambda r: r.update(profile="huge"), "profile: unknown profile 'huge'"),
        (lambda r: r["federation"].update(min_updates=4), "federation: expected min_updates <= per_round <= users"),
        (lambda r: r["datasets"]["omniglot"].update(ratio=[0, 3]), "datasets.omniglot.ratio"),
        (lambda r: r["datasets"]["omniglot"].update(ratio=[1, 30]), "leaves no X_B"),
        (lambda r: r["evaluation"].update(k_shot=10), "evaluation.k_shot"),
    ],
)
def test_invalid_params_are_named(edit, expected: str) -> None:
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(FedmetaError, match=None) as err:
        config.parse(raw)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_missing_archive_folder(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["omniglot"]["source"] = str(tmp_path / "nowhere")
    cwd = workdir(tmp_path, raw)
    done = run_cli(cwd, "prepare")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "datasets.omniglot.source" in done.stderr and "nowhere" in done.stderr
    assert outputs(cwd) == set()


def test_cli_corrupt_archive(tmp_path: Path, omniglot_dir: Path) -> None:
    src = tmp_path / "archives"
    src.mkdir()
    (src / "images_background_small1.zip").write_bytes((omniglot_dir / "images_background_small1.zip").read_bytes()[:5000])
    (src / "images_background_small2.zip").write_bytes((omniglot_dir / "images_background_small2.zip").read_bytes())
    raw = tiny_raw(src)
    cwd = workdir(tmp_path / "w", raw) if (tmp_path / "w").mkdir() is None else None
    done = run_cli(cwd, "prepare")
    assert done.returncode == 2 and "images_background_small1.zip" in done.stderr and "zip" in done.stderr
    assert outputs(cwd) == set()


def test_cli_missing_checkpoint(tmp_path: Path) -> None:
    cwd = workdir(tmp_path, tiny_raw())
    done = run_cli(cwd, "attack", "exclude")
    assert done.returncode == 2 and "dataset.pt" in done.stderr
    assert outputs(cwd) == set()


def test_cli_unknown_variant(tmp_path: Path) -> None:
    done = run_cli(workdir(tmp_path, tiny_raw()), "pretrain", "sometimes")
    assert done.returncode == 2 and "sometimes" in done.stderr
