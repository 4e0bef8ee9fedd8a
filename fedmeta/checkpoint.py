"""Model checkpoints and resumable stage state, loaded with weights_only=True.

A checkpoint is a plain dict of tensors and numbers, so loading it can never
run code; anything else (a pickled object, a truncated file) is refused.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fedmeta.atomic import atomic_path
from fedmeta.errors import FedmetaError
from fedmeta.model import Params


def save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path, required: tuple[str, ...] = ("theta",)) -> dict[str, Any]:
    if not path.is_file():
        raise FedmetaError(f"{path}: checkpoint not found; run the stage that produces it first")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise FedmetaError(f"{path}: refused to load: the checkpoint holds more than tensors and numbers ({str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise FedmetaError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from None
    missing = [k for k in required if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise FedmetaError(f"{path}: not a fedmeta checkpoint (missing {missing[0]!r})")
    return payload


def load_theta(path: Path) -> Params:
    theta = load(path)["theta"]
    if not isinstance(theta, dict) or not all(isinstance(v, torch.Tensor) for v in theta.values()):
        raise FedmetaError(f"{path}: 'theta' is not a dict of tensors")
    return theta


class Resume:
    """Progress of a long loop, saved every `every` iterations to a persisted path and removed when done.

    Seeds derive from (round, user, ...), not from a running RNG, so restarting
    at a saved iteration replays exactly what an uninterrupted run would do.
    """

    def __init__(self, path: Path, every: int, fingerprint: str) -> None:
        self.path, self.every, self.fingerprint = path, every, fingerprint

    def restore(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = load(self.path, required=("fingerprint", "done"))
        return state if state["fingerprint"] == self.fingerprint else None

    def save(self, done: int, state: dict[str, Any], force: bool = False) -> None:
        if force or done % self.every == 0:
            save(self.path, {"fingerprint": self.fingerprint, "done": done, **state})

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
