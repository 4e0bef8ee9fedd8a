"""Long stages resume after a kill and end exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from errors_common import run_cli, workdir

from fedmeta import checkpoint, config, model
from fedmeta.experiment import Experiment

from conftest import cli_env, tiny_raw

OUTPUTS = ("metrics/pretrain_exclude.json", "metrics/pretrain_exclude.csv")


def test_killed_pretraining_resumes_to_identical_outputs(
    tmp_path: Path, omniglot_dir: Path, store: Path, prepared: bytes
) -> None:
    """SIGKILL mid-way (after a saved round), rerun: the same metric files, byte for byte, and the same model."""
    raw = tiny_raw(omniglot_dir)
    raw["profiles"]["tiny"].update(pretrain_rounds=6, checkpoint_every=1)
    raw["evaluation"]["steps"] = 10
    files = {"data/prepared/dataset.pt": prepared}
    whole, killed = (workdir(tmp_path / name, raw, store, files) for name in ("whole", "killed"))
    command = [sys.executable, "-m", "fedmeta", "pretrain", "exclude"]
    uninterrupted = subprocess.Popen(
        command, cwd=whole, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    victim = subprocess.Popen(command, cwd=killed, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "state/pretrain_exclude.pt"
    deadline = time.monotonic() + 120
    while not state.exists():
        assert victim.poll() is None, "the stage ended before its first resumable checkpoint"
        assert time.monotonic() < deadline, "no resumable checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    assert 1 <= torch.load(state, weights_only=True)["done"] < 6
    assert not (killed / "checkpoints").exists() and not any((killed / rel).exists() for rel in OUTPUTS)
    resumed = run_cli(killed, "pretrain", "exclude")
    assert resumed.returncode == 0, resumed.stderr
    assert "state/pretrain_exclude.pt: resuming an interrupted run" in resumed.stderr
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err

    for rel in OUTPUTS:
        assert (killed / rel).read_bytes() == (whole / rel).read_bytes(), rel
    ours, theirs = (checkpoint.load_theta(d / "checkpoints/pretrain_exclude.pt") for d in (killed, whole))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not state.exists()


class Killed(Exception):
    pass


class DyingResume(checkpoint.Resume):
    """Dies right after its `after`-th save, as a killed process would."""

    def __init__(self, path: Path, every: int, fingerprint: str, after: int) -> None:
        super().__init__(path, every, fingerprint)
        self.left = after

    def save(self, done: int, state: dict, force: bool = False) -> None:
        super().save(done, state, force)
        if force or done % self.every == 0:
            self.left -= 1
            if self.left == 0:
                raise Killed


@pytest.mark.parametrize("adam_state", ["episode", "carry"])
def test_interrupted_attack_resumes_to_the_same_model(
    tmp_path: Path, omniglot_dir: Path, tiny_data, adam_state: str
) -> None:
    """The attacker's training stops after 2 of 4 meta-batches; resuming (generator and Adam state restored) gives
    the same θ."""
    raw = tiny_raw(omniglot_dir)
    raw["profiles"]["tiny"].update(attack_episodes=20, checkpoint_every=1)
    raw["reptile"]["adam_state"] = adam_state
    params = config.parse(raw)
    exp = Experiment(params, tiny_data, torch.device("cpu"))
    theta0 = model.init_conv4(
        exp.images.shape[1], params.budget.width, exp.images.shape[-1], params.reptile.n_way, exp.gen("init")
    )
    every, path = params.budget.checkpoint_every * params.reptile.meta_batch, tmp_path / "attack_exclude.pt"

    whole = exp.round(theta0, 1, False, with_attacker=True)
    with pytest.raises(Killed):
        exp.round(theta0, 1, False, with_attacker=True, resume=DyingResume(path, every, "fp", after=2))
    assert torch.load(path, weights_only=True)["done"] == 2 * params.reptile.meta_batch
    resumed = exp.round(theta0, 1, False, with_attacker=True, resume=checkpoint.Resume(path, every, "fp"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_state_of_other_params_or_inputs_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "dataset.pt"
    data.write_bytes(b"one")
    before = checkpoint.fingerprint("{}", data)
    checkpoint.Resume(tmp_path / "s.pt", 1, before).save(3, {"theta": {}})
    data.write_bytes(b"two")
    after = checkpoint.fingerprint("{}", data)
    assert after != before and after != checkpoint.fingerprint('{"seed": 1}', data)
    assert checkpoint.Resume(tmp_path / "s.pt", 1, after).restore() is None
    assert checkpoint.Resume(tmp_path / "s.pt", 1, before).restore()["done"] == 3


def test_equal_checkpoints_are_equal_bytes(tmp_path: Path) -> None:
    """DVC hashes outputs: saving the same payload again (through a new temporary file) must give the same bytes."""
    payload = {"theta": {"w": torch.arange(6.0).view(2, 3)}, "round": 3}
    first, second = tmp_path / "a" / "x.pt", tmp_path / "b" / "x.pt"
    checkpoint.save(first, payload)
    checkpoint.save(second, payload)
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(checkpoint.load_theta(first, "cpu")["w"], payload["theta"]["w"])
