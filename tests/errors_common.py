"""What the tests of bad input (tests/test_errors_*.py) share: running the CLI in a fresh working directory and
the files the cases corrupt; the MLflow store and the prepared dataset they use are conftest's fixtures."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from PIL import Image

from conftest import cli_env

ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")
DRAWING = "images_background_small1/Alpha/character01/9999_01.png"  # a valid place for an extra entry


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmeta", *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True
    )


def cli_in_process(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """What `run_cli` returns, from the entry point called here: in `cwd`, with the CLI's environment and argv, its
    streams captured, and the process state a stage sets (threads, RNG, environment, cwd) restored afterwards."""
    from fedmeta import cli

    env_before, cwd_before, argv_before = dict(os.environ), Path.cwd(), sys.argv
    threads_before, rng_before, state_before = torch.get_num_threads(), torch.get_rng_state(), dict(cli._state)
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(cli_env(env))
    os.chdir(cwd)
    sys.argv = ["fedmeta", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exit_:  # as the interpreter reads it: None is success, a message is failure
        code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        os.chdir(cwd_before)
        sys.argv = argv_before
        torch.set_num_threads(threads_before)
        torch.set_rng_state(rng_before)
        cli._state.update(state_before)
    return subprocess.CompletedProcess(["fedmeta", *args], code, out.getvalue(), err.getvalue())


def workdir(path: Path, raw: dict | None, store: Path | None = None, files: dict[str, bytes] | None = None) -> Path:
    """A working directory holding params.yaml (unless raw is None), a copy of an MLflow store, and `files`."""
    path.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (path / "params.yaml").write_text(yaml.safe_dump(raw))
    if store is not None:
        shutil.copy(store, path / "mlflow.db")
    for rel, data in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def snapshot(cwd: Path) -> dict[str, bytes]:
    """Every file but MLflow's store, which a stage opens before it reads its inputs."""
    return {
        str(p.relative_to(cwd)): p.read_bytes()
        for p in cwd.rglob("*")
        if p.is_file() and not p.name.startswith("mlflow.db") and "mlartifacts" not in p.parts
    }


def refused(cwd: Path, *args: str, culprit: tuple[str, ...], env: dict[str, str] | None = None) -> str:
    """Run the CLI; assert exit code 2, one line naming every part of `culprit`, and no file created or changed."""
    before = snapshot(cwd)
    done = cli_in_process(cwd, *args, env=env)
    line = done.stderr.strip()
    assert done.returncode == 2, done.stderr
    assert line.startswith("error: ") and "\n" not in line, line
    for part in culprit:
        assert part in line, line
    assert snapshot(cwd) == before
    return line


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def png(size: tuple[int, int], mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 255 if mode == "L" else (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


class Payload:
    """Pickles as a call to os.system: loading it without weights_only=True would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


PRETRAINED = "checkpoints/pretrain_exclude.pt"
DATASET = "data/prepared/dataset.pt"
GOOD_CHECKPOINT = torch_bytes({"theta": {"fc.bias": torch.zeros(5)}, "round": 2})


def tiny_theta() -> dict[str, torch.Tensor]:
    from fedmeta import model

    return model.init_conv4(1, 8, 28, 5, torch.Generator().manual_seed(0))  # the tiny profile's model


def archive_dir(path: Path, omniglot_dir: Path) -> Path:
    """A copy of the synthetic archives, to damage."""
    path.mkdir()
    for name in ARCHIVES:
        shutil.copy(omniglot_dir / name, path / name)
    return path


def add_entry(archive: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(name, data)
