"""Bad input: one line naming the culprit, exit code 2, and no output created or changed.

Most cases run the real CLI (`python -m fedmeta <stage>`) in a fresh working
directory; the rest call the library function that does the check.
docs/errors.md lists every message.
"""
from __future__ import annotations

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

from conftest import drawing, tiny_raw
from fedmeta import checkpoint, config, splits
from fedmeta.data.imageset import ImageSet
from fedmeta.data.omniglot import fetch_archives, load_omniglot
from fedmeta.errors import FedmetaError

ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")
DRAWING = "images_background_small1/Alpha/character01/9999_01.png"  # a valid place for an extra entry


# --- helpers -----------------------------------------------------------------

def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage run by hand: MLflow's store in the working dir unless `extra` says otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **(extra or {})}


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmeta", *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True)


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
    done = run_cli(cwd, *args, env=env)
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
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
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
        (lambda r: r["profiles"]["tiny"].update(pretrain_rounds=0), "profiles.tiny.pretrain_rounds"),
        (lambda r: r.update(profile="huge"), "profile: unknown profile 'huge'; allowed: one of"),
        (lambda r: r.update(dataset="cifar"), "dataset: Input should be 'omniglot' or 'miniimagenet' (got 'cifar')"),
        (lambda r: r["federation"].update(min_updates=4), "federation.min_updates: 4 exceeds per_round = 3"),
        (lambda r: r["federation"].update(per_round=4, min_updates=3), "federation.per_round: 4 exceeds the users - 1 = 3"),
        (lambda r: r["federation"].update(attacker=4), "federation.attacker: 4 is not a user index"),
        (lambda r: r["datasets"]["omniglot"].update(ratio=[0, 3]), "datasets.omniglot.ratio.0"),
        (lambda r: r["datasets"]["omniglot"].update(ratio=[1, 30]), "datasets.omniglot.ratio: 1:30 of 10 shots leaves no X_B"),
        (lambda r: r["datasets"]["omniglot"].update(ratio=[30, 1]), "datasets.omniglot.ratio: 30:1 of 10 shots leaves no X_T"),
        (lambda r: r["evaluation"].update(n_way=6), "evaluation.n_way: 6 exceeds the model's 5 outputs"),
        (lambda r: r["evaluation"].update(k_shot=10), "evaluation.k_shot: 10 shots plus 1 query exceed the target's datasets.omniglot.benign_examples = 10"),
    ],
    ids=["unknown-key", "wrong-type", "negative", "budget", "unknown-profile", "unknown-dataset", "min_updates", "per_round", "attacker",
         "ratio-zero", "no-X_B", "no-X_T", "eval-n_way", "k_shot-target"],
)
def test_invalid_params_are_named(edit: Callable[[dict], None], culprit: str) -> None:
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(FedmetaError) as err:
        config.parse(raw)
    assert str(err.value).startswith("params.yaml: ") and culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "culprit"), [(b"\xff\xfe\x00binary", "not valid YAML"), (b"- a\n- list\n", "expected a mapping")], ids=["binary", "list"])
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
    refused(workdir(tmp_path, raw), "pretrain", "exclude", culprit=("params.yaml: reptile.meta_batch", "greater than 0", "(got 0)"))


def test_cli_unknown_variant(tmp_path: Path) -> None:
    done = run_cli(workdir(tmp_path, tiny_raw()), "pretrain", "sometimes")
    assert done.returncode == 2 and "'sometimes' is not one of" in " ".join(done.stderr.replace("│", " ").split())
    assert snapshot(tmp_path) == {"params.yaml": (tmp_path / "params.yaml").read_bytes()}


# --- parameters that only the data can check (at the split) -------------------

@pytest.fixture(scope="session")
def imageset(omniglot_dir: Path) -> ImageSet:
    return load_omniglot([omniglot_dir / a for a in ARCHIVES])


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [
        (lambda r: r["reptile"].update(n_way=21), "reptile.n_way: 21 exceeds the 20 meta-training classes a user holds"),
        (lambda r: (r["datasets"]["omniglot"].update(meta_test_fraction=0.05), r["reptile"].update(n_way=10), r["evaluation"].update(n_way=10)),
         "evaluation.n_way: 10 exceeds the 8 meta-test classes"),
        (lambda r: r["datasets"]["omniglot"].update(backdoor_classes=24), "datasets.omniglot.backdoor_classes: 24 plus the target take all 25"),
        (lambda r: r["datasets"]["omniglot"].update(train_shots=16), "datasets.omniglot.train_shots: 16 shots exceed the 15 training examples"),
        (lambda r: (r["evaluation"].update(k_shot=16), r["datasets"]["omniglot"].update(benign_examples=17)),
         "evaluation.k_shot: 16 shots exceed the 15 training examples"),
        (lambda r: r["datasets"]["omniglot"].update(validation_per_class=20), "datasets.omniglot.validation_per_class: 20 leaves no training examples"),
        (lambda r: r["datasets"]["omniglot"].update(benign_examples=15), "benign_examples + attacker_examples + validation_examples = 25 exceed the 20"),
    ],
    ids=["n_way-per-user", "eval-n_way-meta-test", "backdoor_classes", "train_shots", "k_shot-train", "validation_per_class", "attack-examples"],
)
def test_params_too_large_for_the_data(imageset: ImageSet, edit: Callable[[dict], object], culprit: str) -> None:
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(FedmetaError) as err:
        splits.split(imageset, config.parse(raw))
    assert str(err.value).startswith("params.yaml: ") and culprit in str(err.value) and "\n" not in str(err.value)


def test_k_shot_plus_query_exceeds_a_meta_test_class(imageset: ImageSet, tiny_params: config.Params) -> None:
    """Meta-test classes with 5 examples cannot give 5 shots and a distinct query (the split draws the same classes)."""
    meta_test = splits.split(imageset, tiny_params).meta_test
    keep = torch.cat([torch.nonzero(imageset.labels == c).flatten()[: 5 if c in meta_test else None] for c in range(len(imageset.class_names))])
    small = ImageSet(imageset.images[keep], imageset.labels[keep], imageset.class_names, imageset.groups)
    with pytest.raises(FedmetaError, match=r"evaluation\.k_shot: 5 shots plus 1 query exceed the 5 examples of meta-test class .*; allowed: at most 4"):
        splits.split(small, tiny_params)


def test_cli_n_way_too_large_for_the_data(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    raw = tiny_raw(omniglot_dir)
    raw["reptile"]["n_way"] = 25
    refused(workdir(tmp_path, raw, store), "prepare", culprit=("params.yaml: reptile.n_way: 25 exceeds the 20 meta-training classes",))


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
    with pytest.raises(FedmetaError, match="params.yaml: omniglot.archives: unknown archive 'images_background_small3.zip'; allowed: some of"):
        fetch_archives(str(omniglot_dir), ["images_background_small3.zip"], tmp_path / "unused")


def test_cli_truncated_archive(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    (src / ARCHIVES[0]).write_bytes((omniglot_dir / ARCHIVES[0]).read_bytes()[:5000])
    refused(workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "not a readable zip archive"))


def test_cli_archive_with_corrupt_entry(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    with zipfile.ZipFile(omniglot_dir / ARCHIVES[0]) as good, zipfile.ZipFile(src / ARCHIVES[0], "w", zipfile.ZIP_DEFLATED) as out:
        for info in good.infolist():
            out.writestr(info.filename, good.read(info))
    data = bytearray((src / ARCHIVES[0]).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (src / ARCHIVES[0]).write_bytes(bytes(data))
    refused(workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "not a readable zip archive"))


def test_cli_archive_entry_escaping_the_folder(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], "../evil.png", drawing(0, 0))
    refused(workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "entry '../evil.png' would escape the dataset folder"))
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "w" / "evil.png").exists()


def test_cli_image_of_the_wrong_size(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, png((50, 40), "L"))
    refused(workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(DRAWING.split("/", 1)[1], "expected a 105×105 grey-scale image, got 50×40 mode L"))


@pytest.mark.parametrize(
    ("name", "data", "culprit"),
    [
        ("images_background_small1/../../evil.png", drawing(0, 0), "would escape the dataset folder"),
        ("/tmp/evil.png", drawing(0, 0), "would escape the dataset folder"),
        (DRAWING, png((105, 105), "RGB"), "expected a 105×105 grey-scale image, got 105×105 mode RGB"),
        (DRAWING, b"\x89PNG\r\n\x1a\n but not really", "not a readable PNG (unknown image format)"),
        ("images_background_small1/Alpha/stray.png", drawing(0, 0), "is not <root>/<alphabet>/<character>/<drawing>.png"),
    ],
    ids=["nested-escape", "absolute", "rgb", "undecodable", "wrong-depth"],
)
def test_bad_archive_entry(tmp_path: Path, omniglot_dir: Path, name: str, data: bytes, culprit: str) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], name, data)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / a for a in ARCHIVES])
    assert ARCHIVES[0] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("contents", "culprit"), [(b"PK\x03\x04 not a zip", "not a readable zip archive"), (None, "holds no Omniglot drawings")], ids=["garbage", "no-drawings"])
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
    refused(workdir(tmp_path, tiny_raw(), store), "attack", "exclude", culprit=(f"{DATASET}: prepared dataset not found", "fedmeta prepare"))


def test_cli_truncated_prepared_dataset(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared[: len(prepared) // 2], PRETRAINED: GOOD_CHECKPOINT})
    refused(cwd, "attack", "exclude", culprit=(f"{DATASET}: corrupt or truncated prepared dataset",))


def test_cli_missing_checkpoint(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared})
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: checkpoint not found",))


def test_cli_meta_test_of_a_missing_checkpoint(tmp_path: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), None, {DATASET: prepared})
    refused(cwd, "meta-test", "checkpoints/nowhere.pt", "--out", "curve.json", culprit=("checkpoints/nowhere.pt: checkpoint not found",))


def test_cli_truncated_checkpoint(tmp_path: Path, store: Path, prepared: bytes) -> None:
    cwd = workdir(tmp_path, tiny_raw(), store, {DATASET: prepared, PRETRAINED: GOOD_CHECKPOINT[:-100]})
    refused(cwd, "attack", "exclude", culprit=(f"{PRETRAINED}: corrupt or truncated checkpoint",))


def test_cli_checkpoint_carrying_code_is_refused(tmp_path: Path, store: Path, prepared: bytes) -> None:
    marker = tmp_path / "MARKER"
    cwd = workdir(tmp_path / "w", tiny_raw(), store, {DATASET: prepared, PRETRAINED: torch_bytes({"theta": Payload(marker)})})
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
    refused(cwd, "pretrain", "exclude", culprit=("state/pretrain_exclude.pt: corrupt or truncated checkpoint", "delete it to start the stage over"))


def test_checkpoint_carrying_code_is_refused_by_load(tmp_path: Path) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    path.write_bytes(torch_bytes({"theta": {"w": torch.zeros(2)}, "round": Payload(marker)}))
    with pytest.raises(FedmetaError, match="refused to load"):
        checkpoint.load(path)
    assert not marker.exists()


def test_prepared_dataset_carrying_code_is_refused(tmp_path: Path) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "dataset.pt"
    path.write_bytes(torch_bytes({"images": Payload(marker)}))
    with pytest.raises(FedmetaError, match=r"dataset\.pt: refused to load: the prepared dataset holds more than tensors and numbers") as err:
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
    refused(cwd, "prepare", culprit=(f"{tmp_path}/afile/mlflow.db: MLflow store cannot be created", "is not a directory"), env={"MLFLOW_TRACKING_URI": uri})
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
    assert done.returncode != 0 and "Traceback" in words and "FedmetaError: params.yaml: parameters file not found" in words
