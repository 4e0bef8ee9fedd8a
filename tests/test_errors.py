"""Bad input: one line naming the culprit, exit code 2, and no output created or changed.

Most cases run the CLI's entry point (`fedmeta.cli.main`, what `fedmeta <stage>` runs) in this process, in a
fresh working directory: a process of its own would spend seconds importing torch and MLflow for a check that takes
milliseconds. The cases that need a process of their own (--debug's traceback, a stage whose code is patched, the
prepared dataset the others share) start the real `python -m fedmeta`; the rest call the library function that does
the check. docs/errors.md lists every message.
"""

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

import pytest
import torch
import yaml
from PIL import Image

from fedmeta import checkpoint, config, splits
from fedmeta.data.imageset import ImageSet
from fedmeta.data.omniglot import fetch_archives, load_omniglot
from fedmeta.errors import FedmetaError

from conftest import REPO, cli_env, drawing, tiny_raw

ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")
DRAWING = "images_background_small1/Alpha/character01/9999_01.png"  # a valid place for an extra entry


# --- helpers -----------------------------------------------------------------


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
    cwd = workdir(tmp_path_factory.mktemp("prepared"), tiny_raw(omniglot_dir), store)
    done = run_cli(cwd, "prepare")
    assert done.returncode == 0, done.stderr
    return (cwd / "data/prepared/dataset.pt").read_bytes()


def archive_dir(path: Path, omniglot_dir: Path) -> Path:
    """A copy of the synthetic archives, to damage."""
    path.mkdir()
    for name in ARCHIVES:
        shutil.copy(omniglot_dir / name, path / name)
    return path


def add_entry(archive: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(name, data)


# --- parameters --------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (lambda r: r.update(sedd=1), "sedd: Extra inputs are not permitted"),
        (lambda r: r["reptile"].update(n_way="five"), "reptile.n_way: Input should be a valid integer (got 'five')"),
        (lambda r: r["attack"].update(boost=-1.0), "attack.boost: Input should be greater than 0 (got -1.0)"),
        (
            lambda r: r["attack"].update(target_output="last"),
            "attack.target_output: Input should be 'fixed' or 'random' (got 'last')",
        ),
        (lambda r: r["profiles"]["tiny"].update(pretrain_rounds=0), "profiles.tiny.pretrain_rounds"),
        (lambda r: r.update(profile="huge"), "profile: unknown profile 'huge'; allowed: one of"),
        (lambda r: r.update(dataset="cifar"), "dataset: Input should be 'omniglot' or 'miniimagenet' (got 'cifar')"),
        (lambda r: r["federation"].update(min_updates=4), "federation.min_updates: 4 exceeds per_round = 3"),
        (
            lambda r: r["federation"].update(per_round=4, min_updates=3),
            "federation.per_round: 4 exceeds the users - 1 = 3",
        ),
        (lambda r: r["federation"].update(attacker=4), "federation.attacker: 4 is not a user index"),
        (
            lambda r: r["federation"]["flower"].update(superlink="server.example"),
            "federation.flower.superlink: expected host:port, e.g. server.example:9200 (got 'server.example')",
        ),
        (
            lambda r: r["federation"]["flower"].update(root_certificates="ca.crt"),
            "federation.flower.root_certificates: only a running SuperLink is reached over TLS",
        ),
        (lambda r: r["datasets"]["omniglot"].update(ratio=[0, 3]), "datasets.omniglot.ratio.0"),
        (
            lambda r: r["datasets"]["omniglot"].update(ratio=[1, 30]),
            "datasets.omniglot.ratio: 1:30 of 10 shots leaves no X_B",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(ratio=[30, 1]),
            "datasets.omniglot.ratio: 30:1 of 10 shots leaves no X_T",
        ),
        (lambda r: r["evaluation"].update(n_way=6), "evaluation.n_way: 6 exceeds the model's 5 outputs"),
        (
            lambda r: r["evaluation"].update(k_shot=10),
            "evaluation.k_shot: 10 shots plus 1 query exceed the target's datasets.omniglot.benign_examples = 10",
        ),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "negative",
        "attack-target_output",
        "budget",
        "unknown-profile",
        "unknown-dataset",
        "min_updates",
        "per_round",
        "attacker",
        "superlink-address",
        "tls-without-superlink",
        "ratio-zero",
        "no-X_B",
        "no-X_T",
        "eval-n_way",
        "k_shot-target",
    ],
)
def test_invalid_params_are_named(edit: Callable[[dict], None], culprit: str) -> None:
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(FedmetaError) as err:
        config.parse(raw)
    assert str(err.value).startswith("params.yaml: ") and culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "culprit"),
    [(b"\xff\xfe\x00binary", "not valid YAML"), (b"- a\n- list\n", "expected a mapping")],
    ids=["binary", "list"],
)
def test_unreadable_params_file(tmp_path: Path, text: bytes, culprit: str) -> None:
    (tmp_path / "params.yaml").write_bytes(text)
    with pytest.raises(FedmetaError, match=culprit):
        config.load(tmp_path / "params.yaml")


def test_cli_missing_params_file(tmp_path: Path) -> None:
    refused(workdir(tmp_path, None), "prepare", culprit=("params.yaml: parameters file not found",))


def test_cli_malformed_params_file(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\nreptile: [n_way: 5\n")
    refused(tmp_path, "prepare", culprit=("params.yaml: not valid YAML",))


def test_cli_invalid_param(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["reptile"]["meta_batch"] = 0
    refused(
        workdir(tmp_path, raw),
        "pretrain",
        "exclude",
        culprit=("params.yaml: reptile.meta_batch", "greater than 0", "(got 0)"),
    )


def test_cli_unknown_variant(tmp_path: Path) -> None:
    done = cli_in_process(workdir(tmp_path, tiny_raw()), "pretrain", "sometimes")
    assert done.returncode == 2 and "'sometimes' is not one of" in " ".join(done.stderr.replace("│", " ").split())
    assert snapshot(tmp_path) == {"params.yaml": (tmp_path / "params.yaml").read_bytes()}


# --- parameters that only the data can check (at the split) -------------------


@pytest.fixture(scope="session")
def imageset(omniglot_dir: Path) -> ImageSet:
    return load_omniglot([omniglot_dir / a for a in ARCHIVES])


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (
            lambda r: r["reptile"].update(n_way=21),
            "reptile.n_way: 21 exceeds the 20 meta-training classes a user holds",
        ),
        (
            lambda r: (
                r["datasets"]["omniglot"].update(meta_test_fraction=0.05),
                r["reptile"].update(n_way=10),
                r["evaluation"].update(n_way=10),
            ),
            "evaluation.n_way: 10 exceeds the 8 meta-test classes",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(backdoor_classes=24),
            "datasets.omniglot.backdoor_classes: 24 plus the target take all 25",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(train_shots=16),
            "datasets.omniglot.train_shots: 16 shots exceed the 15 training examples",
        ),
        (
            lambda r: (r["evaluation"].update(k_shot=16), r["datasets"]["omniglot"].update(benign_examples=17)),
            "evaluation.k_shot: 16 shots exceed the 15 training examples",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(validation_per_class=20),
            "datasets.omniglot.validation_per_class: 20 leaves no training examples",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(benign_examples=15),
            "benign_examples + attacker_examples + validation_examples = 25 exceed the 20",
        ),
    ],
    ids=[
        "n_way-per-user",
        "eval-n_way-meta-test",
        "backdoor_classes",
        "train_shots",
        "k_shot-train",
        "validation_per_class",
        "attack-examples",
    ],
)
def test_params_too_large_for_the_data(imageset: ImageSet, edit: Callable[[dict], object], culprit: str) -> None:
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(FedmetaError) as err:
        splits.split(imageset, config.parse(raw))
    assert str(err.value).startswith("params.yaml: ") and culprit in str(err.value) and "\n" not in str(err.value)


def test_k_shot_plus_query_exceeds_a_meta_test_class(imageset: ImageSet, tiny_params: config.Config) -> None:
    """Meta-test classes with 5 examples cannot give 5 shots and a distinct query (the split draws the same classes)."""
    meta_test = splits.split(imageset, tiny_params).meta_test
    keep = torch.cat(
        [
            torch.nonzero(imageset.labels == c).flatten()[: 5 if c in meta_test else None]
            for c in range(len(imageset.class_names))
        ]
    )
    small = ImageSet(imageset.images[keep], imageset.labels[keep], imageset.class_names, imageset.groups)
    with pytest.raises(
        FedmetaError,
        match=r"evaluation\.k_shot: 5 shots plus 1 query exceed the 5 examples of meta-test class .*; "
        r"allowed: at most 4",
    ):
        splits.split(small, tiny_params)


def test_cli_n_way_too_large_for_the_data(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    raw = tiny_raw(omniglot_dir)
    raw["reptile"]["n_way"] = 25
    refused(
        workdir(tmp_path, raw, store),
        "prepare",
        culprit=("params.yaml: reptile.n_way: 25 exceeds the 20 meta-training classes",),
    )


# --- dataset files -----------------------------------------------------------


def test_cli_missing_archive_folder(tmp_path: Path, store: Path) -> None:
    cwd = workdir(tmp_path / "w", tiny_raw(tmp_path / "nowhere"), store)
    refused(cwd, "prepare", culprit=("params.yaml: omniglot.source: folder", "nowhere", "does not exist"))


def test_missing_archive(tmp_path: Path, omniglot_dir: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    (src / ARCHIVES[1]).unlink()
    with pytest.raises(FedmetaError, match=f"params.yaml: omniglot.source: {src / ARCHIVES[1]} is missing"):
        fetch_archives(str(src), list(ARCHIVES), tmp_path / "unused")


def test_unknown_archive(tmp_path: Path, omniglot_dir: Path) -> None:
    with pytest.raises(
        FedmetaError,
        match="params.yaml: omniglot.archives: unknown archive 'images_background_small3.zip'; allowed: some of",
    ):
        fetch_archives(str(omniglot_dir), ["images_background_small3.zip"], tmp_path / "unused")


def test_cli_truncated_archive(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    (src / ARCHIVES[0]).write_bytes((omniglot_dir / ARCHIVES[0]).read_bytes()[:5000])
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "not a readable zip archive")
    )


def test_cli_archive_with_corrupt_entry(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    with (
        zipfile.ZipFile(omniglot_dir / ARCHIVES[0]) as good,
        zipfile.ZipFile(src / ARCHIVES[0], "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in good.infolist():
            out.writestr(info.filename, good.read(info))
    data = bytearray((src / ARCHIVES[0]).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (src / ARCHIVES[0]).write_bytes(bytes(data))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "not a readable zip archive")
    )


def test_cli_archive_entry_escaping_the_folder(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], "../evil.png", drawing(0, 0))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store),
        "prepare",
        culprit=(ARCHIVES[0], "entry '../evil.png' would escape the dataset folder"),
    )
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "w" / "evil.png").exists()


def test_cli_image_of_the_wrong_size(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, png((50, 40), "L"))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store),
        "prepare",
        culprit=(DRAWING.split("/", 1)[1], "expected a 105×105 grey-scale image, got 50×40 mode L"),
    )


@pytest.mark.parametrize(
    ("name", "data", "culprit"),
    [
        ("images_background_small1/../../evil.png", drawing(0, 0), "would escape the dataset folder"),
        ("/tmp/evil.png", drawing(0, 0), "would escape the dataset folder"),
        (DRAWING, png((105, 105), "RGB"), "expected a 105×105 grey-scale image, got 105×105 mode RGB"),
        (DRAWING, b"\x89PNG\r\n\x1a\n but not really", "not a readable PNG (unknown image format)"),
        (
            "images_background_small1/Alpha/stray.png",
            drawing(0, 0),
            "is not <root>/<alphabet>/<character>/<drawing>.png",
        ),
    ],
    ids=["nested-escape", "absolute", "rgb", "undecodable", "wrong-depth"],
)
def test_bad_archive_entry(tmp_path: Path, omniglot_dir: Path, name: str, data: bytes, culprit: str) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], name, data)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / a for a in ARCHIVES])
    assert ARCHIVES[0] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("contents", "culprit"),
    [(b"PK\x03\x04 not a zip", "not a readable zip archive"), (None, "holds no Omniglot drawings")],
    ids=["garbage", "no-drawings"],
)
def test_unusable_archive(tmp_path: Path, contents: bytes | None, culprit: str) -> None:
    path = tmp_path / ARCHIVES[0]
    if contents is None:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("images_background_small1/README.txt", "no drawings here")
    else:
        path.write_bytes(contents)
    with pytest.raises(FedmetaError, match=culprit):
        load_omniglot([path])


# --- prepared dataset, checkpoints and resumable state -------------------------

PRETRAINED = "checkpoints/pretrain_exclude.pt"
DATASET = "data/prepared/dataset.pt"
GOOD_CHECKPOINT = torch_bytes({"theta": {"fc.bias": torch.zeros(5)}, "round": 2})


def test_cli_missing_prepared_dataset(tmp_path: Path, store: Path) -> None:
    refused(
        workdir(tmp_path, tiny_raw(), store),
        "attack",
        "exclude",
        culprit=(f"{DATASET}: prepared dataset not found", "fedmeta prepare"),
    )


def test_cli_truncated_prepared_dataset(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared[: len(prepared) // 2], PRETRAINED: GOOD_CHECKPOINT})
    refused(cwd, "attack", "exclude", culprit=(f"{DATASET}: corrupt or truncated prepared dataset",))


def test_cli_missing_checkpoint(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared})
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: checkpoint not found",))


def test_cli_meta_test_of_a_missing_checkpoint(tmp_path: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), None, {DATASET: prepared})
    refused(
        cwd,
        "meta-test",
        "checkpoints/nowhere.pt",
        "--out",
        "curve.json",
        culprit=("checkpoints/nowhere.pt: checkpoint not found",),
    )


def test_cli_truncated_checkpoint(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared, PRETRAINED: GOOD_CHECKPOINT[:-100]})
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: corrupt or truncated checkpoint",))


def test_cli_checkpoint_carrying_code_is_refused(tmp_path: Path, store: Path, prepared: bytes) -> None:
    marker = tmp_path / "MARKER"
    cwd = workdir(
        tmp_path / "w", tiny_raw(), store, {DATASET: prepared, PRETRAINED: torch_bytes({"theta": Payload(marker)})}
    )
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: refused to load", "more than tensors and numbers"))
    assert not marker.exists()


def test_cli_checkpoint_without_tensors(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared, PRETRAINED: torch_bytes({"theta": {"w": 1.5}})})
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: 'theta' is not a dict of tensors",))


@pytest.mark.parametrize("payload", [{"round": 2}, torch.zeros(3)], ids=["no-theta", "bare-tensor"])
def test_checkpoint_without_theta(tmp_path: Path, payload: object) -> None:
    (tmp_path / "c.pt").write_bytes(torch_bytes(payload))
    with pytest.raises(FedmetaError, match=r"c\.pt: not a fedmeta checkpoint \(missing 'theta'\)"):
        checkpoint.load_theta(tmp_path / "c.pt")


def test_cli_corrupt_resume_state(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared, "state/pretrain_exclude.pt": b"not a checkpoint"})
    refused(
        cwd,
        "pretrain",
        "exclude",
        culprit=("state/pretrain_exclude.pt: corrupt or truncated checkpoint", "delete it to start the stage over"),
    )


def test_checkpoint_carrying_code_is_refused_by_load(tmp_path: Path) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    path.write_bytes(torch_bytes({"theta": {"w": torch.zeros(2)}, "round": Payload(marker)}))
    with pytest.raises(FedmetaError, match="refused to load"):
        checkpoint.load(path)
    assert not marker.exists()


def test_prepared_dataset_carrying_code_is_refused(tmp_path: Path) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "dataset.pt"
    path.write_bytes(torch_bytes({"images": Payload(marker)}))
    with pytest.raises(
        FedmetaError, match=r"dataset\.pt: refused to load: the prepared dataset holds more than tensors and numbers"
    ) as err:
        splits.FederatedData.load(path)
    assert "\n" not in str(err.value) and not marker.exists()


def test_cli_unwritable_output_folder(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    """`data` is a file, so data/prepared/ cannot be made: an OSError, reported like any bad input."""
    cwd = workdir(tmp_path, tiny_raw(omniglot_dir), store, {"data": b"a file, not a folder"})
    refused(cwd, "prepare", culprit=("error: data/prepared: Not a directory",))


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


# --- numbers that cannot compute, devices, duplicate keys (issue 22) ------------


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (lambda r: r["attack"].update(boost=float("inf")), "attack.boost: Input should be a finite number (got inf)"),
        (lambda r: r["attack"].update(boost=1e308), "attack.boost: Input should be less than or equal to 1000000"),
        (lambda r: r["attack"].update(lr=float("nan")), "attack.lr: Input should be a finite number (got nan)"),
        (lambda r: r["evaluation"].update(lr=float("inf")), "evaluation.lr: Input should be a finite number (got inf)"),
        (lambda r: r["evaluation"].update(lr=5.0), "evaluation.lr: Input should be less than or equal to 1"),
        (lambda r: r["defense"].update(lr=float("inf")), "defense.lr: Input should be a finite number (got inf)"),
        (lambda r: r["defense"].update(delta=float("nan")), "defense.delta: Input should be a finite number (got nan)"),
        (
            lambda r: r["profiles"]["tiny"].update(inner_lr=float("inf")),
            "profiles.tiny.inner_lr: Input should be a finite number (got inf)",
        ),
        (
            lambda r: r["profiles"]["tiny"].update(outer_step=float("nan")),
            "profiles.tiny.outer_step: Input should be a finite number (got nan)",
        ),
        (
            lambda r: r["profiles"]["tiny"].update(width=5000),
            "profiles.tiny.width: Input should be less than or equal to 1024",
        ),
        (lambda r: r["reptile"].update(beta2=float("nan")), "reptile.beta2: Input should be a finite number (got nan)"),
        (lambda r: r["key"].update(size=float("inf")), "key.size: Input should be a finite number (got inf)"),
        (
            lambda r: r["omniglot"].update(image_size=4),
            "omniglot.image_size: Input should be greater than or equal to 16 (got 4)",
        ),
        (
            lambda r: r["omniglot"].update(image_size=12),
            "omniglot.image_size: Input should be greater than or equal to 16 (got 12)",
        ),
        (
            lambda r: r["omniglot"].update(image_size=100000),
            "omniglot.image_size: Input should be less than or equal to 1024",
        ),
        (
            lambda r: r["miniimagenet"].update(image_size=8),
            "miniimagenet.image_size: Input should be greater than or equal to 16 (got 8)",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(meta_test_fraction=1),
            "datasets.omniglot.meta_test_fraction: Input should be less than 1 (got 1)",
        ),
        (
            lambda r: r["datasets"]["omniglot"].update(meta_test_fraction=0),
            "datasets.omniglot.meta_test_fraction: Input should be greater than 0 (got 0)",
        ),
        (
            lambda r: r.update(device="meta"),
            "device: device type 'meta' is not supported; allowed: 'cpu', 'cuda' or 'cuda:N' (got 'meta')",
        ),
        (
            lambda r: r.update(device="mps"),
            "device: device type 'mps' is not supported; allowed: 'cpu', 'cuda' or 'cuda:N' (got 'mps')",
        ),
        (lambda r: r.update(device="foo"), "device: not a device name; allowed: 'cpu', 'cuda' or 'cuda:N' (got 'foo')"),
        (lambda r: r.update(device="cpu:1"), "device: there is one CPU device"),
    ],
    ids=[
        "boost-inf",
        "boost-1e308",
        "attack-lr-nan",
        "eval-lr-inf",
        "eval-lr-5",
        "defense-lr-inf",
        "delta-nan",
        "inner_lr-inf",
        "outer_step-nan",
        "width-5000",
        "beta2-nan",
        "key-size-inf",
        "image_size-4",
        "image_size-12",
        "image_size-huge",
        "mini-image_size-8",
        "fraction-1",
        "fraction-0",
        "device-meta",
        "device-mps",
        "device-foo",
        "device-cpu1",
    ],
)
def test_numbers_that_cannot_compute_and_unsupported_devices(edit: Callable[[dict], None], culprit: str) -> None:
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(FedmetaError) as err:
        config.parse(raw)
    assert str(err.value).startswith("params.yaml: ") and culprit in str(err.value) and "\n" not in str(err.value)
    assert ": at most -" not in str(err.value) and "allowed: at most 0" not in str(err.value)


def test_the_smallest_image_side_is_what_conv4_can_take() -> None:
    from fedmeta import model

    assert model.feature_size(config.MIN_IMAGE_SIDE) == 1 and model.feature_size(config.MIN_IMAGE_SIDE - 1) == 0


def test_an_absent_cuda_device_is_refused_in_one_line() -> None:
    """cuda:99: without CUDA (this machine) or with fewer devices, one line either way."""
    raw = tiny_raw()
    raw["device"] = "cuda:99"
    with pytest.raises(FedmetaError) as err:
        config.parse(raw)
    msg = str(err.value)
    assert (
        msg.startswith("params.yaml: device: ")
        and ("no CUDA device is available" in msg or "no such CUDA device" in msg)
        and "\n" not in msg
    )


def test_cli_device_is_refused_before_the_mlflow_run_opens(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["device"] = "foo"
    refused(
        workdir(tmp_path, raw), "pretrain", "exclude", culprit=("params.yaml: device: not a device name", "(got 'foo')")
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_infinite_boost_is_refused_before_any_compute(tmp_path: Path, store: Path, prepared: bytes) -> None:
    raw = tiny_raw()
    raw["attack"]["boost"] = float("inf")  # written as .inf
    cwd = workdir(tmp_path, raw, store, {DATASET: prepared, PRETRAINED: GOOD_CHECKPOINT})
    assert "boost: .inf" in (cwd / "params.yaml").read_text()
    refused(cwd, "attack", "exclude", culprit=("params.yaml: attack.boost: Input should be a finite number (got inf)",))


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        (
            "seed: 0\nthreads: 1\nseed: 1\n",
            "params.yaml: seed: duplicate key (lines 1 and 3); each key may appear once",
        ),
        (
            "attack:\n  boost: 3.0\n  lr: 0.001\n  boost: 5.0\n",
            "params.yaml: attack.boost: duplicate key (lines 2 and 4)",
        ),
        (
            "profiles:\n  tiny: {width: 8, width: 16}\n",
            "params.yaml: profiles.tiny.width: duplicate key (lines 2 and 2)",
        ),
    ],
    ids=["top-level", "nested", "flow-mapping"],
)
def test_duplicate_keys_are_refused_by_name(tmp_path: Path, text: str, culprit: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(FedmetaError) as err:
        config.load(tmp_path / "params.yaml")
    assert culprit in str(err.value) and "\n" not in str(err.value)


def test_the_real_params_file_has_no_duplicate_keys() -> None:
    assert config.load(REPO / "params.yaml").profile


def test_cli_params_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").mkdir()
    refused(tmp_path, "prepare", culprit=("params.yaml: is a directory, not the parameters file",))


def test_cli_archive_folder_that_is_a_file(tmp_path: Path, store: Path) -> None:
    (tmp_path / "archives.zip").write_bytes(b"PK")
    cwd = workdir(tmp_path / "w", tiny_raw(tmp_path / "archives.zip"), store)
    refused(cwd, "prepare", culprit=("params.yaml: omniglot.source:", "archives.zip is a file, not a folder"))


@pytest.mark.parametrize(
    ("fraction", "culprit"),
    [
        (
            0.99,
            "datasets.omniglot.meta_test_fraction: 0.99 puts 34 of the 34 class groups in meta-test, "
            "leaving 0 for meta-training; allowed: at most 0.8235",
        ),
        (
            0.001,
            "datasets.omniglot.meta_test_fraction: 0.001 of 34 class groups puts none in meta-test; "
            "allowed: at least 0.0589",
        ),
    ],
    ids=["nearly-all", "nearly-none"],
)
def test_meta_test_fraction_bounds_are_real(imageset: ImageSet, fraction: float, culprit: str) -> None:
    raw = tiny_raw()
    raw["datasets"]["omniglot"]["meta_test_fraction"] = fraction
    with pytest.raises(FedmetaError) as err:
        splits.split(imageset, config.parse(raw))
    assert culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fraction", [0.8235, 0.0589])
def test_the_suggested_meta_test_fractions_pass_that_check(imageset: ImageSet, fraction: float) -> None:
    """At 0.8235 one benign group (4 classes) is left, too few for 4 users with n_way 5: a later check, not this one."""
    raw = tiny_raw()
    raw["datasets"]["omniglot"]["meta_test_fraction"] = fraction
    try:
        splits.split(imageset, config.parse(raw))
    except FedmetaError as err:
        assert (
            fraction == 0.8235
            and "meta_test_fraction" not in str(err)
            and "reptile.n_way: 5 exceeds the 1 meta-training classes" in str(err)
        )


# --- checkpoints checked against the configured model ---------------------------


def tiny_theta() -> dict[str, torch.Tensor]:
    from fedmeta import model

    return model.init_conv4(1, 8, 28, 5, torch.Generator().manual_seed(0))  # the tiny profile's model


TINY_SPEC = checkpoint.ThetaSpec(width=8, channels=1, image_size=28, n_way=5)


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (lambda t: t.pop("bn3.bias"), "theta lacks 'bn3.bias' (expected Conv4's keys"),
        (_set("extra.weight", torch.zeros(3)), "theta holds unexpected key 'extra.weight' (not a Conv4 parameter"),
        (
            _set("conv1.weight", torch.zeros(8, 8, 5, 5)),
            "theta['conv1.weight'] has shape (8, 8, 5, 5); expected (8, 8, 3, 3) for the configured model "
            "(width 8, 1 channel, image_size 28, n_way 5",
        ),
        (
            lambda t: t.update(
                tiny_theta()
                | {k: torch.zeros(64, *v.shape[1:]) for k, v in tiny_theta().items() if k.startswith("conv0")}
            ),
            "theta['conv0.weight'] has shape (64, 1, 3, 3); expected (8, 1, 3, 3)",
        ),
        (_set("fc.weight", torch.zeros(5, 8 * 5 * 5)), "theta['fc.weight'] has shape (5, 200); expected (5, 8)"),
        (_set("fc.bias", torch.zeros(10)), "theta['fc.bias'] has shape (10,); expected (5,)"),
        (_set("bn0.weight", torch.ones(8, dtype=torch.float64)), "theta['bn0.weight'] is float64; expected float32"),
        (
            _set("conv0.weight", torch.zeros(8, 1, 3, 3, dtype=torch.int64)),
            "theta['conv0.weight'] is int64; expected float32",
        ),
        (
            _set("bn2.bias", torch.tensor([0.0] * 7 + [float("nan")])),
            "theta['bn2.bias'] holds NaN or infinite values (the run that wrote it diverged)",
        ),
        (_set("fc.bias", torch.tensor([0.0] * 4 + [float("inf")])), "theta['fc.bias'] holds NaN or infinite values"),
    ],
    ids=[
        "missing-key",
        "extra-key",
        "conv-5x5",
        "width-64",
        "fc-of-84px",
        "n_way-10",
        "float64",
        "int64",
        "nan",
        "inf",
    ],
)
def test_checkpoint_checked_against_the_configured_model(
    tmp_path: Path, edit: Callable[[dict], object], culprit: str
) -> None:
    theta = tiny_theta()
    edit(theta)
    (tmp_path / "c.pt").write_bytes(torch_bytes({"theta": theta, "round": 2}))
    with pytest.raises(FedmetaError) as err:
        checkpoint.load_theta(tmp_path / "c.pt", "cpu", TINY_SPEC)
    assert (
        str(err.value).startswith(f"{tmp_path / 'c.pt'}: ") and culprit in str(err.value) and "\n" not in str(err.value)
    )


def test_the_configured_model_passes_its_own_check(tmp_path: Path, tiny_exp) -> None:
    (tmp_path / "c.pt").write_bytes(torch_bytes({"theta": tiny_theta(), "round": 2}))
    assert tiny_exp.theta_spec() == TINY_SPEC.__class__(8, 1, 28, 5, tiny_exp.theta_spec().source)
    assert checkpoint.load_theta(tmp_path / "c.pt", "cpu", tiny_exp.theta_spec()).keys() == tiny_theta().keys()


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (_set("conv0.weight", torch.zeros(8, 1, 5, 5)), "theta['conv0.weight'] has shape (8, 1, 5, 5)"),
        (lambda t: t.pop("bn3.bias"), "theta lacks 'bn3.bias'"),
        (_set("bn0.bias", torch.full((8,), float("nan"))), "theta['bn0.bias'] holds NaN or infinite values"),
        (_set("fc.weight", torch.zeros(5, 8, dtype=torch.float64)), "theta['fc.weight'] is float64; expected float32"),
    ],
    ids=["conv-5x5", "missing-key", "nan", "float64"],
)
def test_cli_checkpoint_not_of_the_configured_model(
    tmp_path: Path, store: Path, prepared: bytes, edit: Callable[[dict], object], culprit: str
) -> None:
    theta = tiny_theta()
    edit(theta)
    cwd = workdir(
        tmp_path, tiny_raw(), store, {DATASET: prepared, PRETRAINED: torch_bytes({"theta": theta, "round": 2})}
    )
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: {culprit}",))


# --- the prepared dataset checked by type and against params.yaml ----------------


def _edit_prepared(prepared: bytes, edit: Callable[[dict], object]) -> bytes:
    raw = torch.load(io.BytesIO(prepared), weights_only=True)
    edit(raw)
    return torch_bytes(raw)


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (
            lambda d: d.update(images=d["images"].tolist()[:2]),
            "prepared dataset field 'images' is list; expected a non-empty uint8 tensor [n, C, H, W]",
        ),
        (lambda d: d.update(images=d["images"].float()), "prepared dataset field 'images' is torch.float32"),
        (lambda d: d.update(labels=d["labels"].int()), "prepared dataset field 'labels' is torch.int32"),
        (
            lambda d: d.update(class_names="abc"),
            "prepared dataset field 'class_names' is str; expected a non-empty list of strings",
        ),
        (
            lambda d: d.update(train_idx=d["train_idx"][:3]),
            "prepared dataset field 'train_idx' is list; expected a list of",
        ),
        (lambda d: d.update(user_classes={"a": 1}), "prepared dataset field 'user_classes' is dict"),
        (lambda d: d.update(target="7"), "prepared dataset field 'target' is str; expected a class index"),
        (
            lambda d: d["train_idx"].__setitem__(0, torch.tensor([10**6])),
            "prepared dataset field 'train_idx' holds an index outside 0..",
        ),
        (
            lambda d: d.update(attack_val_idx=torch.tensor([-1])),
            "prepared dataset field 'attack_val_idx' holds an index outside 0..",
        ),
        (
            lambda d: d["user_classes"][1].append(10**6),
            "prepared dataset field 'user_classes' holds a class index outside 0..",
        ),
        (lambda d: d.update(attack_owner=[0]), "prepared dataset field 'attack_owner' must name one of the 4 users"),
    ],
    ids=[
        "images-list",
        "images-float",
        "labels-int32",
        "class_names-str",
        "train_idx-short",
        "user_classes-dict",
        "target-str",
        "index-out-of-range",
        "negative-index",
        "class-out-of-range",
        "attack_owner",
    ],
)
def test_prepared_dataset_fields_are_checked(
    tmp_path: Path, prepared: bytes, edit: Callable[[dict], object], culprit: str
) -> None:
    (tmp_path / "dataset.pt").write_bytes(_edit_prepared(prepared, edit))
    with pytest.raises(FedmetaError) as err:
        splits.FederatedData.load(tmp_path / "dataset.pt")
    assert (
        str(err.value).startswith(f"{tmp_path / 'dataset.pt'}: ")
        and culprit in str(err.value)
        and "\n" not in str(err.value)
    )


@pytest.mark.parametrize(
    ("edit", "raw_edit", "culprit"),
    [
        (
            lambda d: d.update(images=d["images"][:, :, :20, :20].contiguous()),
            None,
            "prepared images are 20×20 with 1 channel(s); params.yaml expects 28×28 with 1 "
            "(omniglot.image_size = 28, dataset = omniglot); re-run `fedmeta prepare`",
        ),
        (
            lambda d: d.update(images=d["images"].expand(-1, 3, -1, -1).contiguous()),
            None,
            "prepared images are 28×28 with 3 channel(s); params.yaml expects 28×28 with 1",
        ),
        (
            lambda d: d.update(user_classes=d["user_classes"][:2], attack_owner=[1] * len(d["attack_owner"])),
            None,
            "prepared for 2 users; params.yaml federation.users = 4; re-run `fedmeta prepare`",
        ),
        (
            lambda d: None,
            lambda r: r["datasets"]["omniglot"].update(backdoor_classes=2),
            "prepared with 4 backdoor classes; params.yaml datasets.omniglot.backdoor_classes = 2",
        ),
        (
            lambda d: None,
            lambda r: (r["reptile"].update(n_way=30), r["evaluation"].update(n_way=5)),
            "a user holds 20 classes, fewer than params.yaml reptile.n_way = 30",
        ),
    ],
    ids=["20px-under-28", "3-channels", "2-users", "backdoor_classes", "n_way"],
)
def test_prepared_dataset_checked_against_params(
    tmp_path: Path,
    prepared: bytes,
    edit: Callable[[dict], object],
    raw_edit: Callable[[dict], object] | None,
    culprit: str,
) -> None:
    raw = tiny_raw()
    if raw_edit is not None:
        raw_edit(raw)
    (tmp_path / "dataset.pt").write_bytes(_edit_prepared(prepared, edit))
    with pytest.raises(FedmetaError) as err:
        splits.FederatedData.load(tmp_path / "dataset.pt", config.parse(raw))
    assert culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (lambda d: d.update(images=d["images"].tolist()[:2]), "prepared dataset field 'images' is list"),
        (
            lambda d: d.update(user_classes=d["user_classes"][:2], attack_owner=[1] * len(d["attack_owner"])),
            "prepared for 2 users",
        ),
        (lambda d: d.update(images=d["images"][:, :, :20, :20].contiguous()), "prepared images are 20×20"),
    ],
    ids=["images-list", "2-users", "20px"],
)
def test_cli_prepared_dataset_not_for_these_params(
    tmp_path: Path, store: Path, prepared: bytes, edit: Callable[[dict], object], culprit: str
) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: _edit_prepared(prepared, edit)})
    refused(cwd, "pretrain", "exclude", culprit=(f"{DATASET}: {culprit}",))


# --- archives and images within bounds -------------------------------------------


def lying_png(width: int, height: int) -> bytes:
    """A 1×1 grey PNG whose header claims width × height (its CRC fixed up, so only the size lies)."""
    import struct
    import zlib

    data = bytearray(png((1, 1), "L"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def lie_about_size(archive: Path, entry: str, claimed: int) -> None:
    """Rewrite the uncompressed size `entry`'s local and central headers declare."""
    import struct

    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(entry)
        real, local_at = info.file_size, info.header_offset
    data = bytearray(archive.read_bytes())
    assert struct.unpack("<I", data[local_at + 22 : local_at + 26])[0] == real
    data[local_at + 22 : local_at + 26] = struct.pack("<I", claimed)
    name, at = entry.encode(), data.index(b"PK\x01\x02")  # the central directory's records, in order
    while data[at + 46 : at + 46 + len(name)] != name:
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 24 : at + 28] = struct.pack("<I", claimed)
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("size", "culprit"),
    [
        ((60000, 60000), "refused as a decompression bomb"),
        ((9000, 9000), "expected a 105×105 grey-scale image, got 9000×9000"),
    ],
    ids=["60000x60000", "9000x9000"],
)
def test_image_bomb_in_an_archive_is_refused_before_decoding(
    tmp_path: Path, omniglot_dir: Path, size: tuple[int, int], culprit: str
) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, lying_png(*size))
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / a for a in ARCHIVES])
    assert DRAWING.split("/", 1)[1] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


def test_cli_image_bomb_in_an_archive(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, lying_png(60000, 60000))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store),
        "prepare",
        culprit=(DRAWING.split("/", 1)[1], "refused as a decompression bomb"),
    )


def test_zip_entry_declaring_a_huge_size_is_refused_before_anything_is_read(
    tmp_path: Path, omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, drawing(0, 0))
    lie_about_size(src / ARCHIVES[0], DRAWING, 1 << 30)  # a 1 GiB entry, as far as the headers go

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("an entry was read before the sizes were checked")

    monkeypatch.setattr(zipfile.ZipFile, "open", never)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / ARCHIVES[0]])
    assert f"entry {DRAWING!r} declares 1073741824 bytes uncompressed, more than the 1048576 a drawing may take" in str(
        err.value
    ) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cap", "culprit"),
    [("MAX_ARCHIVE_BYTES", "its drawings declare"), ("MAX_ENTRIES", "drawings, more than the 100 allowed")],
    ids=["total", "count"],
)
def test_archive_over_the_total_caps_is_refused(
    omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch, cap: str, culprit: str
) -> None:
    from fedmeta.data import omniglot

    monkeypatch.setattr(omniglot, cap, 100)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([omniglot_dir / ARCHIVES[0]])
    assert ARCHIVES[0] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


def test_zip_entry_larger_than_its_header_says_is_cut_off_while_reading(
    tmp_path: Path, omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers can lie: with the header check passed (as a lying header would pass it), reading stops at the cap."""
    from fedmeta.data import omniglot

    monkeypatch.setattr(omniglot, "_check_sizes", lambda path, infos: None)
    monkeypatch.setattr(omniglot, "MAX_ENTRY_BYTES", 100)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([omniglot_dir / ARCHIVES[0]])
    assert "decompresses to more than 100 bytes" in str(err.value) and "entry 'images_background_small1/" in str(
        err.value
    )
    with pytest.raises(FedmetaError, match="w: decompresses to more than 10 bytes"):
        omniglot._read_capped(io.BytesIO(b"\0" * 1000), 10, "w")
    assert omniglot._read_capped(io.BytesIO(b"\0" * 10), 10, "w") == b"\0" * 10


def test_miniimagenet_image_bomb_is_refused(tmp_path: Path) -> None:
    from fedmeta.data.miniimagenet import load_miniimagenet

    for split in ("train", "val", "test"):
        (tmp_path / split / f"n0{split}").mkdir(parents=True)
        (tmp_path / split / f"n0{split}" / "a.png").write_bytes(png((4, 4), "L"))
    (tmp_path / "train" / "n0train" / "b.png").write_bytes(lying_png(60000, 60000))
    with pytest.raises(FedmetaError) as err:
        load_miniimagenet(tmp_path, 16)
    assert str(err.value).startswith(
        f"{tmp_path / 'train/n0train/b.png'}: refused as a decompression bomb"
    ) and "\n" not in str(err.value)


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
        theta, images, sample, n, cfg, steps, eps, adam, g, start=0, state=None, on_meta_batch=None
    ):
        def hook(done, now, st):
            on_meta_batch(done, now if done <= cfg.meta_batch else _nan_like(now), st)

        return real(
            theta, images, sample, n, cfg, steps, eps, adam, g, start, state, None if on_meta_batch is None else hook
        )

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
