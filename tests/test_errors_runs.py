"""Runs that cannot go on: the MLflow store, --debug, and runs that diverge.

Bad input: one line naming the culprit, exit code 2, and no output created or changed.

Most cases run the CLI's entry point (`fedmeta.cli.main`, what `fedmeta <stage>` runs) in this process, in a
fresh working directory: a process of its own would spend seconds importing torch and MLflow for a check that takes
milliseconds. The cases that need a process of their own (--debug's traceback, a stage whose code is patched, the
prepared dataset the others share) start the real `python -m fedmeta`; the rest call the library function that does
the check. docs/errors.md lists every message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from errors_common import DATASET, PRETRAINED, refused, run_cli, tiny_theta, torch_bytes, workdir

from fedmeta import checkpoint

from conftest import cli_env, tiny_raw

# --- the MLflow store ----------------------------------------------------------


def test_cli_mlflow_store_inside_a_file(tmp_path: Path, omniglot_dir: Path) -> None:
    """Fails even as root (permission bits would not): the store's folder is a regular file."""
    (tmp_path / "afile").write_text("")
    uri = f"sqlite:///{tmp_path}/afile/mlflow.db"
    cwd = workdir(tmp_path / "w", tiny_raw(omniglot_dir))
    refused(
        cwd,
        "prepare",
        culprit=(f"{tmp_path}/afile/mlflow.db: MLflow store cannot be created", "is not a directory"),
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert not (cwd / "mlflow.db").exists()


def test_cli_mlflow_store_is_a_directory(tmp_path: Path, omniglot_dir: Path) -> None:
    cwd = workdir(tmp_path, tiny_raw(omniglot_dir))
    (cwd / "mlflow.db").mkdir()
    refused(cwd, "prepare", culprit=("mlflow.db: MLflow store is a directory",))


def test_cli_mlflow_store_not_sqlite(tmp_path: Path, omniglot_dir: Path) -> None:
    cwd = workdir(tmp_path, tiny_raw(omniglot_dir), files={"mlflow.db": b"this is not an SQLite database" * 100})
    refused(cwd, "prepare", culprit=("mlflow.db: cannot open the MLflow store",))


# --- --debug -------------------------------------------------------------------


def test_cli_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run_cli(workdir(tmp_path, None), "--debug", "pretrain", "exclude")
    words = " ".join(done.stderr.replace("│", " ").split())
    assert (
        done.returncode != 0
        and "Traceback" in words
        and "FedmetaError: params.yaml: parameters file not found" in words
    )


# --- runs that diverge stop, and nothing is committed -----------------------------


def _nan_like(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) for k, v in theta.items()}


def test_a_diverging_benign_user_stops_the_round(tiny_exp, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmeta import reptile
    from fedmeta.errors import Diverged

    monkeypatch.setattr(reptile, "meta_train", lambda theta, *a, **k: _nan_like(theta))
    with pytest.raises(Diverged) as err:
        tiny_exp.round(tiny_theta(), 3, False, pretraining=True)
    assert str(err.value).startswith(
        "pretraining round 3 diverged: user "
    ) and "likely cause: profiles.tiny.inner_lr = 0.003" in str(err.value)


def test_a_diverging_attacker_stops_the_round(tiny_exp, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmeta import attack
    from fedmeta.errors import Diverged

    monkeypatch.setattr(attack, "train", lambda p, d, im, theta, rnd, g, resume=None, **_: _nan_like(theta))
    with pytest.raises(Diverged) as err:
        tiny_exp.round(tiny_theta(), 1, False, with_attacker=True)
    assert str(err.value).startswith("round 1 diverged: the attacker's boosted update") and "attack.boost = 3.0" in str(
        err.value
    )


def test_a_diverging_attack_keeps_the_last_good_state(
    tmp_path: Path, tiny_exp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker's resumable state is saved every meta-batch (checkpoint_every 1 × B); a NaN model is never saved."""
    from fedmeta import reptile
    from fedmeta.errors import Diverged

    real = reptile.meta_train

    def poisoned_after_first(
        theta, images, sample, n, cfg, steps, eps, adam, g, start=0, state=None, on_meta_batch=None, *, backend, **kw
    ):
        def hook(done, now, st):
            on_meta_batch(done, now if done <= cfg.meta_batch else _nan_like(now), st)

        hooked = None if on_meta_batch is None else hook
        return real(theta, images, sample, n, cfg, steps, eps, adam, g, start, state, hooked, backend=backend, **kw)

    monkeypatch.setattr(reptile, "meta_train", poisoned_after_first)
    path = tmp_path / "attack.pt"
    every = tiny_exp.params.reptile.meta_batch
    lab_p = tiny_exp.params.model_copy(
        update={
            "profiles": {
                **tiny_exp.params.profiles,
                "tiny": tiny_exp.params.budget.model_copy(update={"attack_episodes": 3 * every}),
            }
        }
    )
    tiny_exp.params = lab_p
    with pytest.raises(
        Diverged, match=r"round 1: the attacker's local training diverged by episode 10 .*attack\.lr = 0\.001"
    ):
        tiny_exp.round(tiny_theta(), 1, False, with_attacker=True, resume=checkpoint.Resume(path, every, "fp"))
    saved = checkpoint.load(path, ("done", "theta"))
    assert saved["done"] == every and all(bool(torch.isfinite(v).all()) for v in saved["theta"].values())


def test_diverging_fine_tuning_stops_the_evaluation(tiny_exp, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmeta import evaluation
    from fedmeta.errors import Diverged

    learner = tiny_exp.finetuner()
    monkeypatch.setattr(evaluation.FineTune, "train", lambda self, state, x, y, b: (_nan_like(state[0]), state[1]))
    with pytest.raises(Diverged) as err:
        tiny_exp.meta_test(tiny_theta(), learner, [0, 4], "t")
    assert str(err.value) == (
        "fine-tuning of 4 evaluation episodes diverged by step 4 (NaN or infinite weights); "
        "likely cause: evaluation.lr too large"
    )


def test_diverging_defense_names_its_learning_rate(tiny_exp, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from fedmeta.defense import MatchingDefense
    from fedmeta.errors import Diverged

    real = MatchingDefense.train

    def nan_train(self, state, x, y, batches):
        out = real(self, state, x, y, batches)
        return dataclasses.replace(out, theta=_nan_like(out.theta))

    monkeypatch.setattr(MatchingDefense, "train", nan_train)
    with pytest.raises(
        Diverged, match=r"fine-tuning of 4 evaluation episodes diverged by step 2 .*likely cause: defense\.lr too large"
    ):
        tiny_exp.meta_test(tiny_theta(), MatchingDefense.from_params(tiny_exp.params, tiny_exp.backend), [2], "t")


def test_cli_diverging_attack_writes_nothing(tmp_path: Path, store: Path, prepared: bytes) -> None:
    """A pretrained model with finite but extreme weights (3e38): the attacker's training overflows to NaN.
    The stage stops in one line naming stage, round and parameter; no attacked model, no metrics, no state."""
    theta = tiny_theta()
    theta["fc.weight"] = torch.full_like(theta["fc.weight"], 3e38)
    cwd = workdir(
        tmp_path, tiny_raw(), store, {DATASET: prepared, PRETRAINED: torch_bytes({"theta": theta, "round": 2})}
    )
    refused(
        cwd,
        "attack",
        "exclude",
        culprit=("error: attack exclude: round 1: the attacker's local training diverged", "attack.lr = 0.001"),
    )
    assert not (cwd / "metrics").exists() and not (cwd / "state").exists()


def test_cli_diverging_pretraining_keeps_its_resumable_state(tmp_path: Path, store: Path, prepared: bytes) -> None:
    """Round 2 of pretraining diverges (a local update forced to NaN): the stage fails in one line, writes no
    metric or checkpoint, and the state saved after round 1 is still there to resume from."""
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared})
    code = (
        "import sys, torch\n"
        "from fedmeta import reptile, cli\n"
        "real, calls = reptile.meta_train, []\n"
        "def meta_train(theta, *a, **k):\n"
        "    calls.append(1)\n"
        "    out = real(theta, *a, **k)\n"
        "    return {n: v * float('nan') for n, v in out.items()} if len(calls) > 3 else out\n"  # round 0: 3 users
        "reptile.meta_train = meta_train\n"
        "sys.argv = ['fedmeta', 'pretrain', 'exclude']\n"
        "cli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=cli_env(), capture_output=True, text=True, check=False
    )
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("error: pretrain exclude: pretraining round 1 diverged: user "), (
        done.stderr
    )
    assert "profiles.tiny.inner_lr = 0.003" in line
    assert not (cwd / "metrics").exists() and not (cwd / "checkpoints").exists()
    assert checkpoint.load(cwd / "state/pretrain_exclude.pt", ("done",))["done"] == 1


def node_raw(**flower: object) -> dict:
    raw = tiny_raw()
    raw["federation"] |= {"engine": "flower", "flower": {"superlink": "10.0.0.1:9200", **flower}}
    return raw


@pytest.mark.parametrize(
    ("raw", "args", "culprit"),
    [
        (tiny_raw(), ("0",), ("federation.flower.superlink is null", "host:port")),
        (node_raw(), ("4",), ("USER: 4 is not a user of this federation; allowed: 0 to 3",)),
        (node_raw(), ("1", "--auth-key", "missing.key"), ("--auth-key: missing.key: no such file",)),
        (node_raw(root_certificates="ca.crt"), ("1",), ("federation.flower.root_certificates: ca.crt: no such file",)),
        (node_raw(), ("1",), (f"{DATASET}: prepared dataset not found",)),
    ],
    ids=["no-superlink", "user", "auth-key", "root-certificates", "no-dataset"],
)
def test_cli_node_refuses_what_it_cannot_join_with(tmp_path: Path, raw: dict, args: tuple[str, ...], culprit) -> None:
    refused(workdir(tmp_path, raw), "node", *args, culprit=culprit)
