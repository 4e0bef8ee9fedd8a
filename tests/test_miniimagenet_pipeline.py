"""End to end on mini-ImageNet: `dvc repro` of the paper's pipeline on the tiny profile, over a generated dataset in
the Ravi-Larochelle layout (images/ + train.csv, val.csv, test.csv) with the paper's 64/16/20 classes of 84×84
images, each holding the fewest images that `datasets.miniimagenet` (at the smaller sizes below) accepts. The
pipeline reads them at a smaller side (SIZE): a ninth of the pixels, so every stage's compute shrinks alike, and
the loader's resizing runs too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedmeta import config
from fedmeta.key import key_pattern

from conftest import BACKGROUND, Repro, sh, tiny_pipeline_raw

# Its stages run in the background from the start of the session (conftest.background_repros), on the second core.
pytestmark = pytest.mark.pipeline
CLASSES = {"train": 64, "val": 16, "test": 20}
SIDE = 84  # the JPEGs' side, as the dataset circulates
SIZE = 28  # miniimagenet.image_size: the side the pipeline reads them at (84 in the paper)
# Every measurement predicts the attack sets for each episode: at the paper's 100 + 50 images they dominate the run.
SPEC = {"benign_examples": 20, "attacker_examples": 10, "validation_examples": 5, "validation_per_class": 5}


def images_per_class(split: str, index: int, spec: dict) -> int:
    """The fewest images each class can hold. The split reserves the first two meta-training classes (sorted by
    wnid) for the attack: target and backdoor class need benign + attacker + validation examples. Other
    meta-training classes need the held-out images plus the larger of train_shots and evaluation.k_shot; a
    meta-test class needs k_shot + 1 (one query); the val split is not used, so one image each."""
    if split == "train":
        if index < 1 + spec["backdoor_classes"]:
            return spec["benign_examples"] + spec["attacker_examples"] + spec["validation_examples"]
        return spec["validation_per_class"] + max(spec["train_shots"], 5)
    return 6 if split == "test" else 1


def write_dataset(root: Path, spec: dict) -> Path:
    """JPEGs, as the dataset circulates: one colour and stripe orientation per class, with per-image noise."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    wnid = 1000000
    for split, count in CLASSES.items():
        with (root / f"{split}.csv").open("w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["filename", "label"])
            for c in range(count):
                wnid += 1
                colour, vertical = rng.integers(40, 216, 3), c % 2 == 0
                stripes = (np.arange(SIDE) // (2 + c % 5)) % 2
                lines = (stripes[None, :] if vertical else stripes[:, None])[..., None] == 1
                base = np.where(lines, colour, 255 - colour)
                for i in range(images_per_class(split, c, spec)):
                    img = np.clip(base + rng.normal(0, 20, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
                    name = f"n{wnid:08d}{i:08d}.jpg"
                    Image.fromarray(img).save(root / "images" / name, quality=90)
                    rows.writerow([name, f"n{wnid:08d}"])
    return root


def start_mini_repo(request: pytest.FixtureRequest) -> Repro:
    factory = request.getfixturevalue("tmp_path_factory")
    raw = tiny_pipeline_raw(None)
    raw["datasets"]["miniimagenet"].update(SPEC)
    source = write_dataset(factory.mktemp("miniimagenet"), raw["datasets"]["miniimagenet"])
    raw["dataset"] = "miniimagenet"
    raw["evaluation"]["steps"] = 2  # every measurement fine-tunes this long: the paper's 50 would dominate the run
    raw["miniimagenet"] |= {"source": str(source), "image_size": SIZE}
    # Experiment 4's pipeline adds no dataset-specific code: it runs on the Omniglot repro (conftest.tiny_repo)
    return Repro(factory.mktemp("mini_repo"), raw, paper_only=True)


BACKGROUND["mini_repo"] = start_mini_repo


@pytest.fixture(scope="session")
def mini_repo(background_repros: dict[str, Repro]) -> Path:
    return background_repros["mini_repo"].result()


def test_every_stage_writes_its_outputs_on_miniimagenet(mini_repo: Path) -> None:
    prepared = json.loads((mini_repo / "metrics/prepare.json").read_text())
    assert prepared["classes_meta_test"] == 20 and sum(prepared["classes_meta_train_per_user"]) == 64 - 2
    assert prepared["attack_training_images"] == SPEC["attacker_examples"]
    assert prepared["attack_validation_images"] == SPEC["validation_examples"]
    stages = yaml.safe_load((mini_repo / "dvc.lock").read_text())["stages"]
    listed = sh(mini_repo, "dvc", "stage", "list", "--name-only").split()
    assert set(listed) <= set(stages)  # every stage ran (dvc.lock also keeps the project's stages not in this run)
    for name in listed:
        for out in stages[name].get("outs", []):
            assert (mini_repo / out["path"]).exists(), f"{name}: {out['path']}"
    outs = {out["path"] for name in listed for out in stages[name].get("outs", [])}
    assert {f"docs/figures/exp{n}_miniimagenet.png" for n in (1, 2, 3)} <= outs  # Figs. 4, 6, 8
    assert "metrics/figures/backdoor_miniimagenet.png" in outs  # Fig. 2
    theta = torch.load(mini_repo / "checkpoints/attacked_include.pt", weights_only=True)["theta"]
    assert theta["conv0.weight"].shape[1] == 3  # RGB input
    for scenario, variant in (("a", "exclude"), ("b", "include"), ("c", "include")):
        with (mini_repo / f"metrics/exp1_{variant}/{scenario}.csv").open() as f:
            assert [row["round"] for row in csv.DictReader(f)] == ["0", "1", "2", "3"]
    report = (mini_repo / "metrics/report.md").read_text()
    assert "dataset `miniimagenet`" in report and "paper (mini-ImageNet)" in report and "Omniglot" not in report
    assert "| a | 74 / 55 (meta-test ≈ 50; before the attack > 60)" in report


def test_every_stage_logs_to_mlflow_as_miniimagenet(mini_repo: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{mini_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fedmeta"])
    stages = {
        "prepare",
        "pretrain",
        "attack",
        "continue",
        "finetune",
        "defend",
        "ablation",
        "positions",
        "report",
    }
    assert stages <= set(runs["tags.stage"])
    assert (runs["tags.dataset"] == "miniimagenet").all() and (runs["tags.profile"] == "tiny").all()
    # one key per quantity; scenario and user are tags of the nested runs that hold the curves
    assert runs[runs["tags.scenario"] == "a"]["metrics.attack_train"].notna().any()
    user2_c = runs[(runs["tags.scenario"] == "c") & (runs["tags.user"] == "2")]
    assert user2_c["metrics.attack_val"].notna().any()


def test_the_key_is_stamped_on_all_three_channels(mini_repo: Path) -> None:
    """Fig. 2c: the checkerboard key in the bottom-right corner is the same black-and-white patch in R, G and B,
    pasted over the attacker's backdoor images (training and validation sets), the rest of each image unchanged."""
    raw = yaml.safe_load((mini_repo / "params.yaml").read_text())
    data = torch.load(mini_repo / "data/prepared/dataset.pt", weights_only=True)
    mask, values = key_pattern(config.parse(raw).key, SIZE, 3)
    assert mask.sum() == 7 * 7 and mask[-1, -1] and not mask[0, 0]  # key.size 0.25 of the side
    stamped = data["images"][torch.cat([data["attack_train_idx"], data["attack_val_idx"]])]
    assert len(stamped) == SPEC["attacker_examples"] + SPEC["validation_examples"]
    patch = stamped[:, :, mask]  # [n, 3, key pixels]
    assert torch.equal(patch, values[:, mask].expand_as(patch))
    assert torch.equal(patch[:, 0], patch[:, 1]) and torch.equal(patch[:, 1], patch[:, 2])
    assert set(patch.unique().tolist()) == {0, 255}
    n = len(data["images"]) - len(stamped)  # stamped copies come after the originals
    originals = data["images"][:n][data["labels"][:n] == data["backdoor"][0]]
    for img in stamped:
        assert (originals[:, :, ~mask] == img[:, ~mask]).flatten(1).all(1).any()
