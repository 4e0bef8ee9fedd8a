"""Shared fixtures: a synthetic Omniglot archive in the real layout, tiny configurations, and the pipeline copies
the end-to-end tests share, reproduced in the background from the start of the session."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fedmeta import config

REPO = Path(__file__).resolve().parents[1]


def drawing(char: int, sample: int) -> bytes:
    """A 105×105 PNG: dark strokes on white, a per-character pattern plus per-drawing jitter."""
    g = torch.Generator().manual_seed(char * 1000 + sample)
    img = torch.full((105, 105), 255, dtype=torch.uint8)
    cg = torch.Generator().manual_seed(char)
    for _ in range(3):
        r, c = (torch.randint(10, 80, (2,), generator=cg) + torch.randint(-4, 5, (2,), generator=g)).tolist()
        img[r : r + 18, c : c + 4] = 0
        img[r : r + 4, c : c + 18] = 0
    buf = io.BytesIO()
    Image.fromarray(img.numpy(), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_archive(path: Path, root: str, alphabets: dict[str, int], drawings: int = 20, first_char: int = 0) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        k = first_char
        for alphabet, n_chars in alphabets.items():
            for c in range(n_chars):
                for s in range(drawings):
                    zf.writestr(f"{root}/{alphabet}/character{c + 1:02d}/{k:04d}_{s + 1:02d}.png", drawing(k, s))
                k += 1
    return path


@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two archives sharing one alphabet (as the real small1/small2 share Greek and Latin)."""
    d = tmp_path_factory.mktemp("omniglot")
    write_archive(d / "images_background_small1.zip", "images_background_small1", {"Alpha": 12, "Shared": 8})
    with (
        zipfile.ZipFile(d / "images_background_small1.zip") as src,
        zipfile.ZipFile(d / "images_background_small2.zip", "w") as dst,
    ):
        for info in src.infolist():
            if "/Shared/" in info.filename:
                dst.writestr(info.filename.replace("small1", "small2"), src.read(info))
        k = 100
        for c in range(14):
            for s in range(20):
                dst.writestr(
                    f"images_background_small2/Beta/character{c + 1:02d}/{k:04d}_{s + 1:02d}.png", drawing(k, s)
                )
            k += 1
    return d


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test, restored afterwards (the bench's --threads sets it process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_raw(omniglot_dir: Path | None = None) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "tiny"
    raw["threads"] = 1
    if omniglot_dir is not None:
        raw["omniglot"]["source"] = str(omniglot_dir)
    return raw


@pytest.fixture()
def tiny_params(omniglot_dir: Path) -> config.Config:
    return config.parse(tiny_raw(omniglot_dir))


def load_tiny(params: config.Config):
    """The prepared dataset of a tiny configuration, from its (synthetic) archives."""
    from fedmeta import splits
    from fedmeta.data.omniglot import fetch_archives, load_omniglot

    o = params.omniglot
    return splits.split(load_omniglot(fetch_archives(o.source, o.archives, Path("unused")), o.image_size), params)


@pytest.fixture()
def tiny_data(tiny_params: config.Config):
    return load_tiny(tiny_params)


@pytest.fixture()
def tiny_exp(tiny_params: config.Config, tiny_data):
    from fedmeta.experiment import Experiment

    return Experiment(tiny_params, tiny_data, torch.device("cpu"))


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the project's CLI, dvc and git run in under test: no telemetry, a git identity, MLflow's
    store in the working dir and no DVC_ROOT inherited from a DVC run of the suite itself, unless `extra` says
    otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    return {
        **env,
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **(extra or {}),
    }


def sh(cwd: Path, *cmd: str) -> str:
    """Run a command of the project's CLI, dvc or git in `cwd`; its stdout, or a failure showing both streams' ends."""
    done = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def tiny_pipeline_raw(omniglot_dir: Path) -> dict:
    """The tiny profile as the end-to-end tests run it: Experiment 4 with only its baseline rule on the paper's
    federation (each rule has its own unit tests; another rule and a larger federation run in tests/test_exp4.py)."""
    raw = tiny_raw(omniglot_dir)
    raw["experiment4"] = {"aggregators": ["mean"], "federations": {"m4": {}}}
    return raw


class Repro:
    """`dvc repro` of a git + DVC copy of the project's tracked files in `dst` with params.yaml `raw`, in a process of
    its own: both pipelines (the paper's and Experiment 4's), or with `paper_only` the paper's. A pipeline's stages
    run one thread each, mostly starting Python, so a repro started at the beginning of the session
    (`background_repros`) runs on the second core while the other tests run on the first."""

    def __init__(self, dst: Path, raw: dict, paper_only: bool = False) -> None:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        for rel in files.stdout.split():
            if rel.startswith(("metrics/", "tests/")) or not (REPO / rel).is_file():
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
        (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        sh(dst, "git", "init", "-q")
        sh(dst, "git", "add", "-A")
        sh(dst, "git", "commit", "-qm", "tiny")
        self.dst, self.log = dst, dst.with_name(dst.name + ".repro.log")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["dvc", "repro", *([] if paper_only else ["-P"])],
                cwd=dst,
                env=cli_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def result(self, timeout: float = 3600) -> Path:
        """The reproduced copy, once `dvc repro` has finished; a failure shows the end of its output."""
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"dvc repro in {self.dst} failed:\n{self.log.read_text()[-4000:]}"
        return self.dst

    def stop(self) -> None:
        if self.proc.poll() is None:  # the session ended early (-x, Ctrl-C): stop the pipeline with it
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# Session fixtures whose `dvc repro` starts with the session when a selected test needs them: name → its Repro.
BACKGROUND: dict[str, Callable[[pytest.FixtureRequest], Repro]] = {
    "tiny_repo": lambda request: Repro(
        request.getfixturevalue("tmp_path_factory").mktemp("repo"),
        tiny_pipeline_raw(request.getfixturevalue("omniglot_dir")),
    ),
}


# Modules whose tests mostly wait (Flower's SuperNodes poll their SuperLink every few seconds): they run first, while
# the background pipelines use the cores they leave idle.
WAITING = ("test_flower.py", "test_flower_network.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Waiting tests first and tests that read a background repro last, so the rest of the suite runs while those
    pipelines do rather than after them (the sort is stable: the order within each group is kept)."""
    items.sort(
        key=lambda item: (
            any(name in BACKGROUND for name in item.fixturenames),
            item.path.name not in WAITING,
        )
    )


@pytest.fixture(scope="session", autouse=True)
def background_repros(request: pytest.FixtureRequest) -> Iterator[dict[str, Repro]]:
    wanted = {name for item in request.session.items for name in item.fixturenames}
    started = {name: make(request) for name, make in BACKGROUND.items() if name in wanted}
    yield started
    for repro in started.values():
        repro.stop()


@pytest.fixture(scope="session")
def tiny_repo(background_repros: dict[str, Repro]) -> Path:
    """A git + DVC copy of the project's tracked files, on the tiny profile and synthetic archives, reproduced once."""
    return background_repros["tiny_repo"].result()


# --- shared by the tests of bad input and of resuming ------------------------


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty MLflow store; each working dir gets a copy, as MLflow takes seconds to create one."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    code = f"import mlflow; mlflow.set_tracking_uri({f'sqlite:///{db}'!r}); mlflow.search_experiments()"
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    return db


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, omniglot_dir: Path, store: Path) -> bytes:
    """The bytes of data/prepared/dataset.pt, prepared once by the CLI on the tiny profile."""
    from errors_common import run_cli, workdir

    cwd = workdir(tmp_path_factory.mktemp("prepared"), tiny_raw(omniglot_dir), store)
    done = run_cli(cwd, "prepare")
    assert done.returncode == 0, done.stderr
    return (cwd / "data/prepared/dataset.pt").read_bytes()
