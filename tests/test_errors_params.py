"""Bad parameters: params.yaml's keys and values, those only the data can check, and numbers that cannot compute.

Bad input: one line naming the culprit, exit code 2, and no output created or changed.

Most cases run the CLI's entry point (`fedmeta.cli.main`, what `fedmeta <stage>` runs) in this process, in a
fresh working directory: a process of its own would spend seconds importing torch and MLflow for a check that takes
milliseconds. The cases that need a process of their own (--debug's traceback, a stage whose code is patched, the
prepared dataset the others share) start the real `python -m fedmeta`; the rest call the library function that does
the check. docs/errors.md lists every message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from errors_common import ARCHIVES, DATASET, GOOD_CHECKPOINT, PRETRAINED, cli_in_process, refused, snapshot, workdir

from fedmeta import config, splits
from fedmeta.data.imageset import ImageSet
from fedmeta.data.omniglot import load_omniglot
from fedmeta.errors import FedmetaError

from conftest import REPO, tiny_raw

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
        (
            lambda r: r["attack"].update(kind="twoshot"),
            "attack.kind: Input should be 'oneshot', 'neurotoxin' or 'repeated' (got 'twoshot')",
        ),
        (
            lambda r: r["attack"].update(neurotoxin_topk=100.0),
            "attack.neurotoxin_topk: Input should be less than 100 (got 100.0)",
        ),
        (
            lambda r: r["attack"].update(neurotoxin_topk=0.0),
            "attack.neurotoxin_topk: Input should be greater than 0 (got 0.0)",
        ),
        (lambda r: r["attack"].update(every=0), "attack.every: Input should be greater than 0 (got 0)"),
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
        "attack-kind",
        "neurotoxin_topk-100",
        "neurotoxin_topk-0",
        "attack-every",
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
    [
        (b"\x00\x01binary\xfe", "not valid YAML"),
        (b"\xff\xfe\x00binary", "saved as UTF-16; save it as UTF-8"),
        (b"- a\n- list\n", "expected a mapping"),
    ],
    ids=["binary", "utf16", "list"],
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


# --- numbers that cannot compute, devices, duplicate keys -------------------


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
