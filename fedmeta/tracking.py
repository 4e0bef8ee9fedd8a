"""MLflow logging into one SQLite store at the repository root.

The store's path comes from DVC_ROOT when DVC runs the stage, so experiments
queued in temporary copies of the repo still log to the main workspace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmeta.errors import FedmetaError, first_line

EXPERIMENT = "fedmeta"
# The experiment's kind for MLflow 3's UI: model training, not a GenAI app. MLflow 3.17's UI shows it only once its
# global switch (top left) says "Model training" (remembered by the browser, or ?workflowType=machine_learning in
# the URL); on the default "GenAI" it opens experiments on the traces overview whatever this tag says.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Tags every run of this process gets, set by the code that knows them: `fast.kernels.select` records which CPU kernels
# it chose and why (here rather than asked for, so that stages which never run Conv4 do not depend on the kernels).
PROCESS_TAGS: dict[str, str] = {}


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Run:
    """The handle a stage logs through."""

    def __init__(self, mlflow: Any, stage: str, own_tags: dict[str, str], tags: dict[str, str]) -> None:
        self._mlflow, self._stage, self._own, self._tags = mlflow, stage, own_tags, tags

    @contextlib.contextmanager
    def child(self, params: dict[str, Any], tags: dict[str, str]) -> Iterator[Run]:
        """A run nested under this one, with this run's tags and its own `tags` and `params`: a stage that runs
        several configurations (Experiment 4's rules) logs each as a run of its own."""
        own, all_tags = {**self._own, **tags}, {**self._tags, **tags}
        with self._mlflow.start_run(run_name=run_name(self._stage, own, all_tags), tags=all_tags, nested=True):
            _log_params(self._mlflow, params)
            yield Run(self._mlflow, self._stage, own, all_tags)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics(values, step=step)

    def artifact(self, path: Path) -> None:
        self._mlflow.log_artifact(str(path))


def _check_sqlite(uri: str) -> None:
    """Refuse an SQLite store that cannot be written before any work starts (SQLite itself fails late and verbosely)."""
    if not uri.startswith("sqlite:///"):
        return
    store = Path(uri.removeprefix("sqlite:///"))
    fix = "fix its permissions or set MLFLOW_TRACKING_URI to a writable sqlite:///<path>"
    if store.is_dir() or not store.parent.is_dir():
        what = "is a directory" if store.is_dir() else f"cannot be created: {store.parent} is not a directory"
        raise FedmetaError(f"{store}: MLflow store {what}; {fix}")
    if not os.access(store.parent, os.W_OK) or (store.exists() and not os.access(store, os.W_OK)):
        raise FedmetaError(f"{store}: MLflow store is not writable; {fix}")


COMMON_TAGS = ("profile", "dataset", "seed", "stage", "git_commit", "dvc_exp")


def run_name(stage: str, stage_tags: dict[str, str], tags: dict[str, str]) -> str:
    """What the runs table shows first: the stage and what the stage's own tags say (variant, and Experiment 4's
    rule, federation, attacker; a "true" tag by its key), then profile, seed and the DVC experiment, so runs of
    queued experiments can be told apart; e.g. `attack-exclude quick seed=0 exp-1a2b3`."""
    own = [v if v != "true" else k for k, v in stage_tags.items() if k not in COMMON_TAGS and v != "false"]
    parts = ["-".join([stage, *own])]
    if "profile" in tags:
        parts.append(tags["profile"])
    if "seed" in tags:
        parts.append(f"seed={tags['seed']}")
    if tags.get("dvc_exp", "workspace") != "workspace":
        parts.append(tags["dvc_exp"])
    return " ".join(parts)


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[Run]:
    """One MLflow run per stage execution, tagged with stage, profile, dataset, commit and DVC experiment."""
    uri = tracking_uri()
    _check_sqlite(uri)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow

    for name in ("mlflow", "alembic"):  # their INFO lines would bury the stage's own output
        logging.getLogger(name).setLevel(logging.WARNING)

    root = repo_root()
    try:
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            location = (root / "mlartifacts").as_uri()
            mlflow.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS)
        elif any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # a store made before the tag
            for k, v in EXPERIMENT_TAGS.items():
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, k, v)
        mlflow.set_experiment(EXPERIMENT)
    except Exception as exc:  # MLflow raises many types for an unusable store
        raise FedmetaError(f"{uri}: cannot open the MLflow store ({type(exc).__name__}: {first_line(exc)})") from None
    dvc_exp = os.environ.get("DVC_EXP_NAME", "workspace")
    all_tags = {"stage": stage, "git_commit": _git_commit(), "dvc_exp": dvc_exp, **PROCESS_TAGS, **tags}
    if "seed" in params:
        all_tags.setdefault("seed", str(params["seed"]))
    with mlflow.start_run(run_name=run_name(stage, tags, all_tags), tags=all_tags):
        _log_params(mlflow, params)
        yield Run(mlflow, stage, tags, all_tags)


def _log_params(mlflow: Any, params: dict[str, Any]) -> None:
    items = list(_flatten(params).items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))
