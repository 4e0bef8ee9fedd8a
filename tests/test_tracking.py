"""A stage's MLflow run, logged by a process of its own: complete when the stage returns, FAILED when the stage
raises, KILLED when the stage dies without a word, and an unusable store refused before any work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmeta import tracking
from fedmeta.errors import FedmetaError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One store for the module's runs (creating one takes MLflow seconds); each test reads its own stage's."""
    folder = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        env.setenv("DVC_ROOT", str(folder))
        yield folder / "mlflow.db"


def runs(db: Path, stage: str):  # type: ignore[no-untyped-def]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    found = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT])
    return found[found["tags.stage"] == stage]


@pytest.fixture()
def new_logging_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The next stage run starts a logging process of its own (the suite's process already has one)."""
    monkeypatch.setattr(tracking, "_logger", None)
    yield
    if tracking._logger is not None:
        tracking._logger.stop()


def test_a_run_is_complete_when_the_stage_returns(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_logging_process: None
) -> None:
    """Logged by this fedmeta's code even where the working directory holds another (a clone of another commit)."""
    (tmp_path / "fedmeta").mkdir()
    (tmp_path / "fedmeta" / "__init__.py").write_text("raise ImportError('the working directory's fedmeta')\n")
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("attack", {"seed": 3}, {"variant": "exclude"}) as run:
        for step in range(3):
            run.metrics({"attack_train": step / 10}, step=step)
        run.tag("engine", "local")
        with run.child({"rule": "median"}, {"aggregator": "median"}) as child:
            child.metrics({"meta_test": 0.9})
    found = runs(store, "attack")
    parent = found[found["tags.aggregator"].isna()].iloc[0]
    nested = found[found["tags.aggregator"] == "median"].iloc[0]
    assert parent["status"] == nested["status"] == "FINISHED"
    assert parent["metrics.attack_train"] == 0.2 and parent["params.seed"] == "3"
    assert parent["tags.engine"] == "local" and parent["tags.mlflow.runName"] == "attack-exclude seed=3"
    assert nested["tags.mlflow.parentRunId"] == parent["run_id"] and nested["metrics.meta_test"] == 0.9
    assert tracking.current() is None


def test_a_series_is_a_nested_run_under_plain_keys_with_its_tags_and_table(store: Path, tmp_path: Path) -> None:
    """The same quantity has the same key on every run (the scenario and user are tags); the intervals stay in the
    attached table, not in metrics."""
    table = tmp_path / "b_user2.csv"
    table.write_text("step,attack_train,attack_train_ci95\n0,0.9,0.1\n5,0.7,0.1\n")
    rows = [{"step": 0, "attack_train": 0.9, "attack_train_ci95": 0.1}, {"step": 5, "attack_train": 0.7}]
    with tracking.stage_run("defend", {}, {"variant": "include"}) as run:
        run.series({"experiment": "exp3", "scenario": "b", "user": "2"}, rows, "step", (table,))
    found = runs(store, "defend")
    parent, child = found[found["tags.scenario"].isna()].iloc[0], found[found["tags.scenario"] == "b"].iloc[0]
    assert child["tags.mlflow.parentRunId"] == parent["run_id"] and child["tags.variant"] == "include"
    assert child["tags.user"] == "2" and child["tags.experiment"] == "exp3" and child["metrics.attack_train"] == 0.7
    assert [c for c in found.columns if c.startswith("metrics.") and child.notna()[c]] == ["metrics.attack_train"]
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(child["run_id"], "attack_train")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (5, 0.7)]
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(child["run_id"])] == ["b_user2.csv"]


def test_a_stage_that_raises_leaves_a_failed_run_and_the_next_logs_as_usual(store: Path) -> None:
    """Both through this process's one logging process."""
    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run("pretrain", {}, {}) as run:
        run.metrics({"loss": 1.0})
        raise RuntimeError("boom")
    with tracking.stage_run("finetune", {}, {}) as run:
        run.metrics({"loss": 0.5})
    (status,) = runs(store, "pretrain")["status"]
    assert status == "FAILED"
    assert runs(store, "finetune")["status"].tolist() == ["FINISHED"]


def test_a_stage_killed_mid_run_leaves_a_killed_run_with_what_it_logged(store: Path) -> None:
    """The stage dies without closing the pipe (os._exit, as after SIGKILL): the logging process ends the run."""
    code = textwrap.dedent(
        """
        import os
        from fedmeta import tracking
        with tracking.stage_run("continue", {}, {}) as run:
            run.metrics({"meta_test": 0.5}, step=1)
            os._exit(9)
        """
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 9
    found = None
    for _ in range(1200):  # the orphaned logging process finishes on its own, creating the store first
        time.sleep(0.1)
        try:
            found = runs(store, "continue")
        except Exception:  # noqa: BLE001 -- the store is still being created
            continue
        if len(found) and found["status"].iloc[0] != "RUNNING":
            break
    assert found is not None and found["status"].iloc[0] == "KILLED" and found["metrics.meta_test"].iloc[0] == 0.5


def test_a_store_that_is_not_a_database_is_refused_before_the_stage_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not SQLite" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with pytest.raises(FedmetaError, match="mlflow.db: cannot open the MLflow store"):
        with tracking.stage_run("prepare", {}, {}):
            pytest.fail("the stage ran")
