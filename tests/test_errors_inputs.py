"""Inputs that used to hang, crash or block the wrong pipeline: each refused in one line naming the key or file and
its real bound (docs/errors.md). Library calls, no stage: each check runs before any compute."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedmeta import config, federation, runtime, seed_runs, tracking
from fedmeta.engine import node
from fedmeta.errors import FedmetaError

from conftest import REPO, tiny_raw


def params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def refused_params(raw: dict) -> str:
    with pytest.raises(FedmetaError) as err:
        config.parse(raw)
    line = str(err.value)
    assert line.startswith("params.yaml: ") and "\n" not in line, line
    return line


# --- sizes that cannot fit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "reptile",
            "inner_batch",
            100000,
            "reptile.inner_batch: 100000 exceeds the 50 examples of a meta-training episode "
            "(reptile.n_way = 5 × datasets.omniglot.train_shots = 10); allowed: at most 50",
        ),
        ("reptile", "inner_batch", 51, "allowed: at most 50"),
        (
            "evaluation",
            "batch",
            26,
            "evaluation.batch: 26 exceeds the 25 support examples of an evaluation episode "
            "(evaluation.n_way = 5 × evaluation.k_shot = 5); allowed: at most 25",
        ),
        ("reptile", "meta_batch", 10**6, "reptile.meta_batch: Input should be less than or equal to 1000"),
        ("reptile", "inner_steps", 10**9, "reptile.inner_steps: Input should be less than or equal to 100000"),
        ("evaluation", "steps", 10**9, "evaluation.steps: Input should be less than or equal to 100000"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_with_their_bound(section: str, key: str, value: int, message: str) -> None:
    raw = tiny_raw()
    raw[section][key] = value
    assert message in refused_params(raw)


def test_the_largest_batches_that_fit_are_accepted() -> None:
    raw = tiny_raw()
    raw["reptile"]["inner_batch"], raw["evaluation"]["batch"] = 50, 25
    assert config.parse(raw).reptile.inner_batch == 50


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("eval_episodes", 10**9, "profiles.tiny.eval_episodes: Input should be less than or equal to 10000"),
        ("eval_episodes", 1, "profiles.tiny.eval_episodes: Input should be greater than or equal to 2 (got 1)"),
        ("finetune_steps", 10**9, "profiles.tiny.finetune_steps: Input should be less than or equal to 100000"),
        ("attack_inner_epochs", 10**9, "profiles.tiny.attack_inner_epochs: Input should be less than or equal to"),
    ],
    ids=["eval_episodes-huge", "eval_episodes-1", "finetune_steps-huge", "attack_inner_epochs-huge"],
)
def test_budget_counts_held_at_once_are_bounded(key: str, value: int, bound: str) -> None:
    raw = tiny_raw()
    raw["profiles"]["tiny"][key] = value
    assert bound in refused_params(raw)


def test_a_key_size_below_two_pixels_is_refused_with_the_smallest_size() -> None:
    raw = tiny_raw()
    raw["key"]["size"] = 0.01
    assert refused_params(raw) == (
        "params.yaml: key.size: 0.01 of a 28-pixel omniglot.image_size is 0 pixels, below the key's 2; "
        "allowed: at least 0.0536 (the key's side is round(key.size × image side) pixels)"
    )
    raw["key"]["size"] = 0.0536
    assert config.parse(raw).key.size == 0.0536


# --- params.yaml as a file -----------------------------------------------------------------------------------------


def test_an_alias_bomb_is_refused_in_one_line_without_expanding(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = params_file(tmp_path, "\n".join(lines) + "\n" + (REPO / "params.yaml").read_text())
    start = time.monotonic()
    with pytest.raises(FedmetaError, match=r"^.*params\.yaml: aliases expand to more than 100000 values \(line \d+\)"):
        config.load(path)
    assert time.monotonic() - start < 5


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedmetaError, match=r"params\.yaml: an alias refers to itself \(line 1\)"):
        config.load(params_file(tmp_path, "x: &a [*a]\n"))


def test_a_deep_nest_is_refused_in_one_line(tmp_path: Path) -> None:
    path = params_file(tmp_path, "seed: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(FedmetaError) as err:
        config.load(path)
    assert str(err.value) == f"{path}: nested deeper than 64 levels (line 1); allowed: at most 64"


def test_a_utf16_params_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes((REPO / "params.yaml").read_text().encode("utf-16"))
    with pytest.raises(FedmetaError, match=r"params\.yaml: saved as UTF-16; save it as UTF-8$"):
        config.load(path)


def test_the_real_params_file_is_within_the_limits() -> None:
    assert config.load(REPO / "params.yaml").seed == yaml.safe_load((REPO / "params.yaml").read_text())["seed"]


# --- Experiment 4's rules, where they run ------------------------------------------------------------------------


def test_experiment4_rules_do_not_block_the_papers_federation() -> None:
    """Two users, one update a round under `mean`: the paper's stages run it; Experiment 4's stage refuses its
    federation m4 (which inherits min_updates = 1) and says which stage it blocks."""
    raw = tiny_raw()
    raw["federation"].update(users=2, per_round=1, min_updates=1)
    params = config.parse(raw)
    assert params.federation.min_updates == 1
    with pytest.raises(FedmetaError) as err:
        config.check_experiment4(params, "m4", "exp4 exclude m4")
    assert str(err.value) == (
        "params.yaml: experiment4.federations.m4 with aggregator median: federation.aggregator: 'median' needs at "
        "least 3 updates a round to outvote one, but federation.min_updates = 1; allowed: min_updates >= 3; "
        "this blocks Experiment 4's stage exp4 exclude m4 (experiment4/dvc.yaml)"
    )


# --- the MLflow store ----------------------------------------------------------------------------------------------


def test_a_write_locked_store_is_named_after_a_bounded_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "mlflow.db"
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")  # readers allowed, writers wait
    monkeypatch.setattr(tracking, "LOCK_WAIT_S", 0.2)
    try:
        start = time.monotonic()
        with pytest.raises(FedmetaError) as err:
            tracking._check_store(f"sqlite:///{store}")
        assert time.monotonic() - start < 3
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert str(err.value).startswith(f"{store}: MLflow store is locked for writing by another process (waited 0 s)")
    tracking._check_store(f"sqlite:///{store}")  # released: accepted


def test_an_unreachable_tracking_server_fails_in_seconds() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(FedmetaError) as err:
        tracking._check_store(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < tracking.CONNECT_S + 1
    assert str(err.value).startswith(f"MLFLOW_TRACKING_URI: http://127.0.0.1:{port}: no tracking server at 127.0.0.1:")


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns"])
def test_a_file_store_is_refused_before_any_work(uri: str) -> None:
    with pytest.raises(FedmetaError, match=rf"^MLFLOW_TRACKING_URI: {uri}: MLflow's file store is not supported"):
        tracking._check_store(uri)


def test_artifacts_follow_a_moved_repository(tmp_path: Path) -> None:
    """The store of a repository moved from /old: its experiment's and runs' artifact URIs now point beside it."""
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE experiments (experiment_id, name, artifact_location)")
        db.execute("CREATE TABLE runs (run_uuid, experiment_id, artifact_uri)")
        db.execute("INSERT INTO experiments VALUES (1, 'fedmeta', 'file:///old/mlartifacts')")
        db.execute("INSERT INTO experiments VALUES (2, 'other', 'file:///old/mlartifacts')")
        db.execute("INSERT INTO runs VALUES ('r', 1, 'file:///old/mlartifacts/r/artifacts')")
    tracking._follow_move(store, tmp_path / "mlartifacts")
    with sqlite3.connect(store) as db:
        locations = db.execute("SELECT name, artifact_location FROM experiments ORDER BY name").fetchall()
        uri = db.execute("SELECT artifact_uri FROM runs").fetchone()[0]
    new = (tmp_path / "mlartifacts").as_uri()
    assert locations == [("fedmeta", new), ("other", "file:///old/mlartifacts")]  # only fedmeta's experiment
    assert uri == f"{new}/r/artifacts"


# --- metric files and git ------------------------------------------------------------------------------------------


def test_metric_files_with_conflict_markers_are_named(tmp_path: Path) -> None:
    good = runtime.csv_text([{"round": 0, "attack_train": 0.5}])
    conflicted = f"<<<<<<< HEAD\n{good}=======\n{good}>>>>>>> theirs\n"
    (tmp_path / "a.csv").write_text(conflicted)
    (tmp_path / "a.json").write_text('<<<<<<< HEAD\n{"a": 1}\n=======\n{"a": 2}\n>>>>>>> theirs\n')
    for path, read in ((tmp_path / "a.csv", runtime.read_csv), (tmp_path / "a.json", runtime.read_json)):
        with pytest.raises(FedmetaError) as err:
            read(path)
        assert str(err.value) == (
            f"{path}: not a readable metrics file (git merge-conflict markers from line 1; resolve the conflict "
            "(or rerun the stage that writes it))"
        )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("round,attack_train\n0,abc\n", "ValueError: could not convert string to float: 'abc'"),
        ("round,attack_train\n0\n", "TypeError"),
        ("round,attack_train\n", "no rows"),
    ],
)
def test_unreadable_metric_csvs_are_named(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "exp1.csv"
    path.write_text(text)
    with pytest.raises(FedmetaError, match=rf"^{path}: not a readable metrics file \({why}"):
        runtime.read_csv(path)


def test_seeds_outside_git_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FedmetaError) as err:
        seed_runs.experiment_ref(tmp_path, "some-exp")
    assert str(err.value).startswith(f"{tmp_path}: not a git repository; --exp reads DVC experiments from git")


def test_seeds_names_a_git_failure(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(FedmetaError, match=r"^git show in .*: fatal: "):
        seed_runs._git(tmp_path, "show", "no-such-ref:params.yaml")


# --- a node's SuperLink ------------------------------------------------------------------------------------------


def test_a_node_whose_superlink_never_answers_stops_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(node, "REACH_S", 1.0)
    start = time.monotonic()
    with pytest.raises(FedmetaError) as err:
        node._reach(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 3
    assert str(err.value).startswith(
        f"federation.flower.superlink: nothing accepts connections at 127.0.0.1:{port} within 1 s ("
    )


# --- what the server receives --------------------------------------------------------------------------------------


def _theta() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"w": torch.full((2, 3), float("nan")), "b": torch.zeros(2)}, "user 2's update holds NaN or infinite weights"),
        ({"w": torch.zeros(2, 3)}, "user 2's update lacks 'b' (expected the model's keys b, w)"),
        (
            {**_theta(), "x": torch.zeros(1)},
            "user 2's update holds unexpected key 'x' (expected the model's keys b, w)",
        ),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, "user 2's update['w'] has shape (3, 2); expected (2, 3)"),
        (
            {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(2)},
            "user 2's update['w'] is float64; expected",
        ),
        ({"w": [0.0] * 6, "b": torch.zeros(2)}, "user 2's update['w'] is list; expected float32"),
    ],
)
def test_the_server_rejects_a_bad_update_naming_its_user(delta: dict, message: str) -> None:
    with pytest.raises(federation.RejectedUpdate) as err:
        federation.check_update(1, delta, _theta(), attacker=0)
    assert str(err.value).startswith(message)


def test_the_attackers_update_is_named_as_such_and_a_good_update_passes() -> None:
    bad = {"w": torch.full((2, 3), float("inf")), "b": torch.zeros(2)}
    with pytest.raises(federation.RejectedUpdate, match="^the attacker's boosted update holds NaN or infinite"):
        federation.check_update(0, bad, _theta(), attacker=0)
    federation.check_update(1, _theta(), _theta(), attacker=0)


def test_a_checkpoint_path_that_is_a_folder_is_named_as_such(tmp_path: Path) -> None:
    """`fedmeta meta-test checkpoints` (the folder, not a file in it) used to say the checkpoint was not found."""
    from fedmeta import checkpoint

    with pytest.raises(FedmetaError, match=rf"^{tmp_path}: is a directory, not a checkpoint file$"):
        checkpoint.load(tmp_path)
