"""MLflow logging into one SQLite store at the repository root, by a process of its own.

The store's path comes from DVC_ROOT when DVC runs the stage, so experiments
queued in temporary copies of the repo still log to the main workspace.

Importing MLflow and opening its SQL store take seconds of Python, more than a small stage's own work; a child
process (`tracking.serve`) does both while the stage imports torch and computes, and logs what the
stage sends it over a pipe, in order. The stage waits for it only at the end, so its run is complete when the
stage's command returns.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fedmeta import atomic
from fedmeta.errors import FedmetaError, first_line

EXPERIMENT = "fedmeta"
# The experiment's kind for MLflow 3's UI: model training, not a GenAI app. MLflow 3.17's UI shows it only once its
# global switch (top left) says "Model training" (remembered by the browser, or ?workflowType=machine_learning in
# the URL); on the default "GenAI" it opens experiments on the traces overview whatever this tag says.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Tags every run of this process gets, set by the code that knows them: `fast.kernels.choose` records which CPU kernels
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


# The quantities a stage measures, each one MLflow key on every run, whatever the scenario, user or experiment (those
# are the run's tags), so that one chart compares them across runs; their intervals stay in the artifact tables.
QUANTITIES = ("meta_test", "main", "attack_train", "attack_val")


def quantities(point: dict[str, Any]) -> dict[str, float]:
    """The QUANTITIES of a measured point, without its intervals and counters."""
    return {k: point[k] for k in QUANTITIES if k in point}


class Run:
    """The handle a stage logs through: each call is a message to the logging process."""

    def __init__(self, logger: _Logger, stage: str, own_tags: dict[str, str], tags: dict[str, str]) -> None:
        self._logger, self._stage, self._own, self._tags = logger, stage, own_tags, tags

    @contextlib.contextmanager
    def child(self, params: dict[str, Any], tags: dict[str, str]) -> Iterator[Run]:
        """A run nested under this one, with this run's tags and its own `tags` and `params`: a stage that runs
        several configurations (Experiment 4's rules) logs each as a run of its own."""
        own, all_tags = {**self._own, **tags}, {**self._tags, **PROCESS_TAGS, **tags}  # kernels chosen since
        with self._logger.run(run_name(self._stage, own, all_tags), all_tags, params, nested=True):
            yield Run(self._logger, self._stage, own, all_tags)

    def series(
        self, tags: dict[str, str], rows: list[dict[str, Any]], x: str | None = None, artifacts: tuple[Path, ...] = ()
    ) -> None:
        """One curve (or one point) as a nested run tagged with what it is of (experiment, scenario, user, ...):
        its QUANTITIES under their plain keys, stepped by `x`, and the `artifacts` that hold it with its intervals."""
        with self.child({}, tags) as child:
            for row in rows:
                child.metrics(quantities(row), step=None if x is None else int(row[x]))
            for path in artifacts:
                child.artifact(path)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._logger.send("metrics", values=values, step=step)

    def tag(self, key: str, value: str) -> None:
        self._logger.send("tag", key=key, value=value)

    def artifact(self, path: Path) -> None:
        """Log the file at `path`, by that name, as it is now: staged, it is still a temporary file beside it."""
        self._logger.send("artifact", path=str(atomic.current(path).resolve()), name=Path(path).name)


LOCK_WAIT_S = 10.0  # how long a stage waits for another process's write to the SQLite store before refusing
CONNECT_S = 3.0  # how long a stage waits for an HTTP tracking server to accept a connection
# MLflow's HTTP client retries 7 times with exponential backoff (minutes against a server that is down); a stage's
# logging process retries less, so that a server gone mid-stage fails it in seconds, unless the user chose otherwise
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _check_store(uri: str) -> None:
    """Refuse a store that cannot be used before any work starts: the logging process opens it while the stage
    computes, and MLflow fails late and verbosely (an HTTP server that is down: after minutes of retries)."""
    if uri.startswith("file:") or "://" not in uri:  # MLflow 3 refuses it, but only once the logging process opens it
        raise FedmetaError(
            f"MLFLOW_TRACKING_URI: {uri}: MLflow's file store is not supported; "
            "allowed: sqlite:///<path> (unset: mlflow.db) or http[s]://host[:port]"
        )
    if uri.startswith(("http://", "https://")):
        _check_http(uri)
    if not uri.startswith("sqlite:///"):
        return
    store = Path(uri.removeprefix("sqlite:///"))
    fix = "fix its permissions or set MLFLOW_TRACKING_URI to a writable sqlite:///<path>"
    if store.is_dir() or not store.parent.is_dir():
        what = "is a directory" if store.is_dir() else f"cannot be created: {store.parent} is not a directory"
        raise FedmetaError(f"{store}: MLflow store {what}; {fix}")
    if not os.access(store.parent, os.W_OK) or (store.exists() and not os.access(store, os.W_OK)):
        raise FedmetaError(f"{store}: MLflow store is not writable; {fix}")
    if store.exists():
        try:
            with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise FedmetaError(_unusable(uri, exc)) from None
        _check_writable(store)
        if store == repo_root() / "mlflow.db":
            _follow_move(store, artifact_root())


def artifact_root() -> Path:
    """Where the repository's MLflow artifacts live: beside its store, wherever the repository is now."""
    return repo_root() / "mlartifacts"


def _follow_move(store: Path, root: Path) -> None:
    """MLflow stores an experiment's artifact location as an absolute URI, so a repository moved (`mv`) would
    keep logging into the old path's mlartifacts/, recreating it; the experiment's location and its runs' are
    moved to `root` instead, in one transaction (the files themselves moved with the repository)."""
    new = root.as_uri()
    with contextlib.closing(sqlite3.connect(store, timeout=LOCK_WAIT_S, isolation_level=None)) as db:
        try:
            found = db.execute("SELECT experiment_id, artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,))
            rows = found.fetchall()
        except sqlite3.OperationalError:  # a store MLflow has not initialised yet: nothing to move
            return
        moved = [
            (eid, old) for eid, old in rows if old != new and old.startswith("file://") and old.endswith("/mlartifacts")
        ]
        if not moved:
            return
        db.execute("BEGIN IMMEDIATE")
        for eid, old in moved:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, eid))
            db.execute(
                "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                (new, len(old) + 1, eid, len(old) + 1, old + "/"),
            )
        db.execute("COMMIT")


def _check_writable(store: Path) -> None:
    """Wait up to LOCK_WAIT_S for the store's write lock (other stages hold it for milliseconds at a time), then
    let it go; a process that keeps it longer is named as the cause, instead of SQLAlchemy's errors later."""
    try:
        with contextlib.closing(sqlite3.connect(store, timeout=LOCK_WAIT_S, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise FedmetaError(f"{store}: cannot open the MLflow store ({first_line(exc)})") from None
        raise FedmetaError(
            f"{store}: MLflow store is locked for writing by another process (waited {LOCK_WAIT_S:.0f} s); "
            "wait for it to finish, or set MLFLOW_TRACKING_URI to another sqlite:///<path>"
        ) from None


def _check_http(uri: str) -> None:
    """A tracking server must accept a connection within CONNECT_S seconds."""
    parts = urllib.parse.urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise FedmetaError(f"MLFLOW_TRACKING_URI: {uri}: expected http[s]://host[:port]")
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_S).close()
    except OSError as exc:
        why = f"no answer within {CONNECT_S:.0f} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise FedmetaError(
            f"MLFLOW_TRACKING_URI: {uri}: no tracking server at {parts.hostname}:{port} ({why}); "
            "start it, or unset MLFLOW_TRACKING_URI to log to mlflow.db"
        ) from None


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
    global _current
    uri = tracking_uri()
    _check_store(uri)
    logger = logging_process()
    dvc_exp = os.environ.get("DVC_EXP_NAME", "workspace")
    all_tags = {"stage": stage, "git_commit": _git_commit(), "dvc_exp": dvc_exp, **PROCESS_TAGS, **tags}
    if "seed" in params:
        all_tags.setdefault("seed", str(params["seed"]))
    try:
        logger.send("open", uri=uri, location=artifact_root().as_uri())
        with logger.run(run_name(stage, tags, all_tags), all_tags, params, nested=False):
            _current = Run(logger, stage, tags, all_tags)
            yield _current
    except BaseException:
        logger.flush(failed=True)
        raise
    finally:
        _current = None
    logger.flush(failed=False)


def current() -> Run | None:
    """The run of the stage in progress in this process, if any (code far from the stage tags it, e.g. the
    Flower engine)."""
    return _current


_current: Run | None = None
_logger: _Logger | None = None


def logging_process() -> _Logger:
    """This process's logging process, started now if it is not running: the CLI starts it before the stage imports
    torch, so that it imports MLflow meanwhile. It serves every stage run of the process (the tests run many in
    one) and is stopped when the process exits; each stage waits for its own run to be logged."""
    global _logger
    if _logger is None or not _logger.alive():
        if _logger is None:
            atexit.register(_stop)
        _logger = _Logger()
    return _logger


def _stop() -> None:
    if _logger is not None:
        _logger.stop()


class _Logger:
    """The stage's side of the pipe to the logging process."""

    def __init__(self) -> None:
        env = {**HTTP_RETRIES, **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}
        # This very fedmeta, whatever the working directory holds (-I: neither it nor PYTHONPATH on the path).
        root = Path(__file__).resolve().parents[1]
        argv = [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(root)!r}); import fedmeta.tracking as t; t.serve()",
        ]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to: IO[str] = self._proc.stdin
        self._from: IO[str] = self._proc.stdout

    def alive(self) -> bool:
        return self._proc.poll() is None

    def send(self, op: str, **fields: Any) -> None:
        try:
            self._to.write(json.dumps({"op": op, **fields}, default=float) + "\n")
            self._to.flush()
        except BrokenPipeError:  # it has stopped; flush() reports it
            pass

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str], params: dict[str, Any], nested: bool) -> Iterator[None]:
        self.send("start", name=name, tags=tags, params=_flatten(params), nested=nested)
        try:
            yield
        except BaseException:
            self.send("end", status="FAILED")
            raise
        self.send("end", status="FINISHED")

    def flush(self, failed: bool) -> None:
        """Wait until everything sent is logged; its error, if any, is raised (unless the stage failed already)."""
        self.send("flush")
        reply = self._from.readline()
        if not reply:
            self.stop()
            if not failed:
                raise FedmetaError(f"MLflow: the logging process exited with code {self._proc.returncode}")
            return
        error = json.loads(reply)["error"]
        if error and not failed:
            raise FedmetaError(error)

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()
        with contextlib.suppress(BrokenPipeError):  # what it exited without reading
            self._to.close()
        self._from.close()


def _serve(commands: IO[str], replies: IO[str]) -> None:
    """The logging process: MLflow's calls for each message, in order, until the stage's process closes the pipe.
    The first error since the last `flush` is kept and the rest skipped, and the reply to `flush` carries it. A run
    left open (the stage's process was killed) ends as KILLED."""
    import mlflow
    from mlflow.store.tracking import sqlalchemy_store  # noqa: F401 -- imported now, while the stage starts up

    for name in ("mlflow", "alembic"):  # their INFO lines would bury the stage's own output
        logging.getLogger(name).setLevel(logging.WARNING)
    error, opened = None, 0
    for line in commands:
        msg = json.loads(line)
        op = msg["op"]
        if op == "flush":
            replies.write(json.dumps({"error": error}) + "\n")
            replies.flush()
            error = None
            continue
        if error is not None:
            continue
        try:
            if op == "open":
                error = _open(mlflow, msg["uri"], msg["location"])
            elif op == "start":
                mlflow.start_run(run_name=msg["name"], tags=msg["tags"], nested=msg["nested"])
                opened += 1
                items = list(msg["params"].items())
                for i in range(0, len(items), 100):
                    mlflow.log_params(dict(items[i : i + 100]))
            elif op == "end":
                mlflow.end_run(status=msg["status"])
                opened -= 1
            elif op == "metrics":
                mlflow.log_metrics(msg["values"], step=msg["step"])
            elif op == "tag":
                mlflow.set_tag(msg["key"], msg["value"])
            elif op == "artifact":
                _log_artifact(mlflow, Path(msg["path"]), msg["name"])
        except Exception as exc:
            error = f"MLflow: {type(exc).__name__}: {first_line(exc)}"
    for _ in range(opened):
        mlflow.end_run(status="KILLED")


def _log_artifact(mlflow: Any, path: Path, name: str) -> None:
    """`path` logged as `name` (a staged output's temporary file under its final name)."""
    if path.name == name:
        mlflow.log_artifact(str(path))
        return
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(path, Path(folder) / name)
        mlflow.log_artifact(str(Path(folder) / name))


def _open(mlflow: Any, uri: str, location: str) -> str | None:
    """Open the store and its experiment (created with its tags if new); an error message if it cannot be."""
    try:
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            mlflow.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS)
        elif any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # a store made before the tag
            for k, v in EXPERIMENT_TAGS.items():
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, k, v)
        mlflow.set_experiment(EXPERIMENT)
    except Exception as exc:  # MLflow raises many types for an unusable store
        return _unusable(uri, exc)
    return None


def _unusable(uri: str, exc: Exception) -> str:
    return f"{uri}: cannot open the MLflow store ({type(exc).__name__}: {first_line(exc)})"


def serve() -> None:
    """The logging process's entry point (see `_Logger`)."""
    # Ctrl-C reaches the whole process group: the stage ends its runs as FAILED and waits for them to be logged, or
    # dies and leaves them to end as KILLED here, so this process must outlive the interrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = sys.stdout
    sys.stdout = sys.stderr  # anything MLflow prints goes to the stage's stderr, not into the replies
    _serve(sys.stdin, replies)
