"""Bad saved state: the prepared dataset, checkpoints and resumable state, checked by type and against params.yaml.

Bad input: one line naming the culprit, exit code 2, and no output created or changed.

Most cases run the CLI's entry point (`fedmeta.cli.main`, what `fedmeta <stage>` runs) in this process, in a
fresh working directory: a process of its own would spend seconds importing torch and MLflow for a check that takes
milliseconds. The cases that need a process of their own (--debug's traceback, a stage whose code is patched, the
prepared dataset the others share) start the real `python -m fedmeta`; the rest call the library function that does
the check. docs/errors.md lists every message.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from errors_common import DATASET, GOOD_CHECKPOINT, PRETRAINED, Payload, refused, tiny_theta, torch_bytes, workdir

from fedmeta import checkpoint, config, splits
from fedmeta.errors import FedmetaError

from conftest import tiny_raw

# --- prepared dataset, checkpoints and resumable state -------------------------


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
    refused(
        cwd, "prepare", culprit=("error: data/prepared/dataset.pt: cannot write this checkpoint (Not a directory)",)
    )


# --- checkpoints checked against the configured model ---------------------------


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
