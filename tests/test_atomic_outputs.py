"""A stage writes all of its outputs or none (`atomic.all_or_none`): a failure at any point, a read-only folder or a
full disk included, leaves every previous output as it was, and the message names the file being written."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedmeta import atomic, checkpoint
from fedmeta.errors import FedmetaError

from conftest import cli_env, tiny_raw

# --- the staging itself ------------------------------------------------------------------------------------------


def test_outputs_appear_together_when_the_block_succeeds(tmp_path: Path) -> None:
    a, b, state = tmp_path / "m" / "a.json", tmp_path / "b.csv", tmp_path / "state.pt"
    state.write_text("resumable")
    with atomic.all_or_none():
        atomic.write_text(a, "new a")
        atomic.write_text(b, "new b")
        atomic.remove(state)
        assert not a.exists() and not b.exists() and state.exists()  # staged, beside their final paths
        assert atomic.current(a).read_text() == "new a" and atomic.current(a).parent == a.parent
    assert (a.read_text(), b.read_text(), state.exists()) == ("new a", "new b", False)
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_a_failure_inside_the_block_changes_nothing(tmp_path: Path) -> None:
    a, b, state = tmp_path / "a.json", tmp_path / "b.pt", tmp_path / "state.pt"
    a.write_text("old a")
    state.write_text("resumable")
    with pytest.raises(RuntimeError), atomic.all_or_none():
        atomic.write_text(a, "new a")
        checkpoint.save(b, {"theta": {}})
        atomic.remove(state)
        raise RuntimeError("the MLflow store failed")
    assert (a.read_text(), b.exists(), state.read_text()) == ("old a", False, "resumable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "state.pt"]  # no temporary file left


def test_now_writes_at_once_inside_the_block(tmp_path: Path) -> None:
    """Resumable state and the files Flower's processes wait for cannot wait for the end of the stage."""
    with pytest.raises(RuntimeError), atomic.all_or_none():
        checkpoint.save(tmp_path / "state.pt", {"done": 1}, now=True)
        raise RuntimeError
    assert (tmp_path / "state.pt").is_file()


def test_a_file_written_twice_keeps_the_last(tmp_path: Path) -> None:
    with atomic.all_or_none():
        atomic.write_text(tmp_path / "a.md", "first")
        atomic.write_text(tmp_path / "a.md", "second")
    assert [p.name for p in tmp_path.iterdir()] == ["a.md"] and (tmp_path / "a.md").read_text() == "second"


def test_a_failed_write_names_the_file_not_its_temporary_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails the write with no file named (ENOSPC); the message names the output and what it is."""
    old = tmp_path / "metrics" / "attack_exclude.json"
    old.parent.mkdir()
    old.write_text("old")

    def full(self: Path, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(FedmetaError) as err, atomic.all_or_none():
        atomic.write_text(old, "new")
    monkeypatch.undo()
    assert str(err.value) == f"{old}: cannot write this JSON file (No space left on device); nothing was written"
    assert old.read_text() == "old" and [p.name for p in old.parent.iterdir()] == ["attack_exclude.json"]


# --- a stage, with its metrics folder read-only or full ----------------------------------------------------------


@contextlib.contextmanager
def mounted(args: list[str], target: Path) -> Iterator[None]:
    """`mount args target` for the block; skipped where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only even for root: a read-only bind mount of itself."""
    with mounted(["--bind", str(folder)], folder):
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {done.stderr.strip()}")
        yield


def prepare(cwd: Path, seed: int, omniglot_dir: Path) -> subprocess.CompletedProcess[str]:
    raw = tiny_raw(omniglot_dir)
    raw["seed"] = seed
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "fedmeta", "prepare"], cwd=cwd, env=cli_env(), capture_output=True, text=True
    )


def outputs(cwd: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(cwd)): p.read_bytes()
        for p in [*(cwd / "data").rglob("*"), *(cwd / "metrics").rglob("*")]
        if p.is_file()
    }


@pytest.fixture()
def prepared_once(tmp_path: Path, omniglot_dir: Path) -> Path:
    """A working directory where `fedmeta prepare` has run once (seed 0)."""
    done = prepare(tmp_path, 0, omniglot_dir)
    assert done.returncode == 0, done.stderr
    return tmp_path


@pytest.mark.skipif(sys.platform != "linux", reason="mounts are Linux's")
def test_a_read_only_metrics_folder_leaves_every_output_as_it_was(prepared_once: Path, omniglot_dir: Path) -> None:
    """Another seed changes every output; with metrics/ read-only the prepared dataset (written first) must not be
    replaced either."""
    cwd, before = prepared_once, outputs(prepared_once)
    with read_only(cwd / "metrics"):
        done = prepare(cwd, 1, omniglot_dir)
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("error: metrics/"), done.stderr
    assert "(Read-only file system); nothing was written" in line
    assert outputs(cwd) == before


@pytest.mark.skipif(sys.platform != "linux", reason="mounts are Linux's")
def test_a_full_disk_leaves_every_output_as_it_was(prepared_once: Path, omniglot_dir: Path) -> None:
    cwd, before = prepared_once, outputs(prepared_once)
    data = cwd / "data" / "prepared"
    saved = (data / "dataset.pt").read_bytes()
    with mounted(["-t", "tmpfs", "-o", f"size={len(saved) + 64 * 1024}", "tmpfs"], data):
        (data / "dataset.pt").write_bytes(saved)
        with contextlib.suppress(OSError), (data / "filler").open("wb") as f:
            f.write(b"\0" * (1 << 20))  # whatever room is left
        done = prepare(cwd, 1, omniglot_dir)
        assert (data / "dataset.pt").read_bytes() == saved
        assert sorted(p.name for p in data.iterdir()) == ["dataset.pt", "filler"]
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr
    assert line == (
        "error: data/prepared/dataset.pt: cannot write this checkpoint (No space left on device); nothing was written"
    )
    assert outputs(cwd) == before
