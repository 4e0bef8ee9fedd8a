"""Stage prepare: read the dataset, split it among users, stamp the backdoor key (paper Sec. 3, Figs. 1-2)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmeta import figures, runtime, splits, tracking
from fedmeta.config import Config
from fedmeta.data.imageset import ImageSet
from fedmeta.key import stamp


def read_dataset(params: Config) -> ImageSet:
    if params.dataset == "omniglot":
        from fedmeta.data.omniglot import CACHE, fetch_archives, load_omniglot

        o = params.omniglot
        # the cache at the workspace root (DVC_ROOT), also for experiments DVC queues in temporary copies
        archives = fetch_archives(o.source, o.archives, tracking.repo_root() / CACHE)
        return load_omniglot(archives, o.image_size, o.rotations)
    from fedmeta.data.miniimagenet import load_miniimagenet

    return load_miniimagenet(Path(params.miniimagenet.source), params.miniimagenet.image_size)


def main() -> None:
    with runtime.stage("prepare") as (params, run):
        data = splits.split(read_dataset(params), params)
        data.save(runtime.PREPARED)
        blank = torch.zeros_like(data.images[:1])
        fig = figures.backdoor_examples(
            data, stamp(blank, params.key)[0], runtime.FIGURES / f"backdoor_{params.dataset}.png", params.dataset
        )
        summary = {
            "classes_meta_train_per_user": [len(c) for c in data.user_classes],
            "classes_meta_test": len(data.meta_test),
            "attack_training_images": len(data.attack_train_idx),
            "attack_validation_images": len(data.attack_val_idx),
            "images": len(data.labels),
        }
        runtime.write_json(runtime.METRICS / "prepare.json", summary)
        run.metrics({"classes_meta_test": summary["classes_meta_test"], "images": summary["images"]})
        run.artifact(fig)
