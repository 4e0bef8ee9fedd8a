"""The MLflow UI as a user meets it: `mlflow server` on 127.0.0.1 serves the runs the stages log, with their
names, tags and per-step metric histories (what the UI's charts plot), and the search that shows Fig. 3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fedmeta import tracking
from fedmeta.engine.processes import free_port

START_TIMEOUT_S = 120


def get(base: str, path: str, **query: str) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two seeds of one stage, as two queued experiments would log them: Experiment 1's curve of a scenario as a
    nested run, with step=round."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for seed, exp in ((0, "exp-aaaa1"), (1, "exp-bbbb2")):
        monkeypatch.setenv("DVC_EXP_NAME", exp)
        with tracking.stage_run(
            "continue", {"seed": seed, "attack": {"boost": 3.0}}, {"profile": "tiny", "variant": "exclude"}
        ) as run:
            rows = [
                {"round": rnd, "attack_train": 1.0 - 0.2 * rnd, "meta_test": 0.5 + 0.1 * rnd + 0.01 * seed}
                for rnd in range(4)
            ]
            run.series({"experiment": "exp1", "scenario": "a"}, rows, "round")
    return db


def test_mlflow_server_shows_named_runs_and_metric_curves(store: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (store.parent / "server.log").open("wb")  # a file, not a pipe: a chatty server never blocks on it
    server = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=store.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if get(base, "/health") == b"OK":
                    break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited: {(store.parent / 'server.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"mlflow server did not answer within {START_TIMEOUT_S} s"
            time.sleep(0.5)
        assert b"<html" in get(base, "/").lower()  # the UI's page (its routes are client-side: #/experiments/...)
        experiment = json.loads(get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="fedmeta"))[
            "experiment"
        ]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
        runs = search(base, experiment["experiment_id"], "tags.stage = 'continue'")
        names = sorted(r["info"]["run_name"] for r in runs)
        assert names == [
            "continue-exclude tiny seed=0 exp-aaaa1",
            "continue-exclude tiny seed=1 exp-bbbb2",
            "continue-exclude-exp1-a tiny seed=0 exp-aaaa1",
            "continue-exclude-exp1-a tiny seed=1 exp-bbbb2",
        ]
        # The README's view of Fig. 3: the runs tagged experiment exp1, one curve per scenario and run
        runs = search(base, experiment["experiment_id"], "tags.experiment = 'exp1'")
        assert sorted(r["info"]["run_name"] for r in runs) == names[2:]
        run = next(r for r in runs if r["info"]["run_name"].endswith("exp-bbbb2"))
        run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert (
            run_tags["seed"] == "1"
            and run_tags["stage"] == "continue"
            and run_tags["profile"] == "tiny"
            and run_tags["dvc_exp"] == "exp-bbbb2"
            and run_tags["scenario"] == "a"
            and run_tags["variant"] == "exclude"
        )
        got = json.loads(get(base, "/api/2.0/mlflow/runs/get", run_id=run["info"]["run_id"]))["run"]
        assert got["info"]["run_name"] == run["info"]["run_name"]
        history = json.loads(
            get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key="meta_test")
        )
        points = sorted((m["step"], m["value"]) for m in history["metrics"])
        assert [s for s, _ in points] == [0, 1, 2, 3] and points[-1][1] == pytest.approx(0.81)
    finally:
        stop(server)
        log.close()


def search(base: str, experiment_id: str, filter_string: str) -> list[dict]:
    body = json.dumps({"experiment_ids": [experiment_id], "max_results": 10, "filter": filter_string}).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["runs"]


def stop(server: subprocess.Popen) -> None:
    """The server and the workers it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
