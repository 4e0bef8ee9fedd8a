"""Model checkpoints and resumable stage state, loaded with weights_only=True.

A checkpoint is a plain dict of tensors and numbers, so loading it can never
run code; anything else (a pickled object, a truncated file) is refused.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmeta import atomic, model
from fedmeta.atomic import atomic_path
from fedmeta.errors import FedmetaError, first_line
from fedmeta.model import Theta


def save(path: Path, payload: dict[str, Any], now: bool = False) -> None:
    """torch.save, atomically and byte-reproducibly: given a path, torch.save names the archive's inner folder
    after the (random) temporary file, so equal payloads would hash differently for DVC; a file object does not.
    `now`: in place at once, even inside `atomic.all_or_none` (resumable state, files another process waits for)."""
    with atomic_path(path, now) as tmp, tmp.open("wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
            raise OSError(errno.EIO, f"{first_line(exc)}") from None


def load(
    path: Path, required: tuple[str, ...] = ("theta",), device: torch.device | str = "cpu", what: str = "checkpoint"
) -> dict[str, Any]:
    """A dict saved by torch.save holding the `required` keys; `what` names the file in messages."""
    if path.is_dir():
        raise FedmetaError(f"{path}: is a directory, not a {what} file")
    if not path.is_file():
        raise FedmetaError(f"{path}: {what} not found; run the stage that produces it first")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; without this check torch reports junk as unsafe pickle
        raise FedmetaError(f"{path}: corrupt or truncated {what} (not a zip archive written by torch.save)")
    try:
        payload = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError as exc:
        why = next((line for line in str(exc).splitlines() if "GLOBAL" in line), first_line(exc))
        raise FedmetaError(
            f"{path}: refused to load: the {what} holds more than tensors and numbers ({why.strip()})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise FedmetaError(f"{path}: corrupt or truncated {what} ({first_line(exc)})") from None
    missing = [k for k in required if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise FedmetaError(f"{path}: not a fedmeta {what} (missing {missing[0]!r})")
    return payload


def load_theta(path: Path, device: torch.device | str = "cpu", expect: ThetaSpec | None = None) -> Theta:
    """The model of a checkpoint; with `expect`, checked to be exactly the configured Conv4 (one line per problem)."""
    theta = load(path, device=device)["theta"]
    if not isinstance(theta, dict) or not all(isinstance(v, torch.Tensor) for v in theta.values()):
        raise FedmetaError(f"{path}: 'theta' is not a dict of tensors")
    if expect is not None:
        expect.check(theta, path)
    return theta


@dataclass(frozen=True)
class ThetaSpec:
    """What a stage's model must be: Conv4 of `width` filters over `channels` × `image_size`² images with `n_way`
    outputs. `source` says where each number comes from, for messages."""

    width: int
    channels: int
    image_size: int
    n_way: int
    source: str = ""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Derived from the model's own initialiser, so they never drift from it."""
        theta = model.init_conv4(
            self.channels, self.width, self.image_size, self.n_way, torch.Generator().manual_seed(0)
        )
        return {k: tuple(v.shape) for k, v in theta.items()}

    def check(self, theta: Theta, path: Path | str, what: str = "theta") -> None:
        """Key set, then dtype, shape and finiteness of each tensor (one isfinite pass per tensor, at load only)."""
        shapes = self.shapes()
        missing, extra = sorted(shapes.keys() - theta.keys()), sorted(theta.keys() - shapes.keys())
        if missing:
            raise FedmetaError(
                f"{path}: {what} lacks {missing[0]!r} (expected Conv4's keys {', '.join(sorted(shapes))})"
            )
        if extra:
            raise FedmetaError(
                f"{path}: {what} holds unexpected key {extra[0]!r} "
                f"(not a Conv4 parameter; expected {', '.join(sorted(shapes))})"
            )
        config = (
            f"width {self.width}, {self.channels} channel{'s' if self.channels != 1 else ''}, "
            f"image_size {self.image_size}, n_way {self.n_way}"
        )
        for key in sorted(shapes):
            t = theta[key]
            if t.dtype != torch.float32:
                raise FedmetaError(
                    f"{path}: {what}[{key!r}] is {str(t.dtype).removeprefix('torch.')}; expected float32"
                )
            if tuple(t.shape) != shapes[key]:
                raise FedmetaError(
                    f"{path}: {what}[{key!r}] has shape {tuple(t.shape)}; "
                    f"expected {shapes[key]} for the configured model "
                    f"({config}{self.source}); a checkpoint of another profile or dataset?"
                )
            if t.layout != torch.strided:
                raise FedmetaError(f"{path}: {what}[{key!r}] is a {t.layout} tensor; expected a dense one")
        for key in sorted(shapes):
            if not bool(torch.isfinite(theta[key]).all()):
                raise FedmetaError(
                    f"{path}: {what}[{key!r}] holds NaN or infinite values (the run that wrote it diverged)"
                )


def fingerprint(params_json: str, *inputs: Path) -> str:
    """What a saved state is valid for: the parameters and the exact input files,
    so a re-prepared dataset or a new pretrained model never resumes a stale loop."""
    digest = hashlib.sha256(params_json.encode())
    for path in inputs:
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


class Resume:
    """Progress of a long loop, saved every `every` iterations to a persisted path and removed when done.

    Seeds derive from (round, user, ...), not from a running RNG, so restarting
    at a saved iteration replays exactly what an uninterrupted run would do; a
    loop that does draw from one generator saves its state with the rest.
    A state saved for other parameters or inputs (another fingerprint) is ignored.
    """

    def __init__(
        self, path: Path, every: int, fingerprint: str, on_progress: Callable[[int], None] | None = None
    ) -> None:
        """`on_progress(done)` hears of every iteration offered for saving, saved or not (a progress bar)."""
        self.path, self.every, self.fingerprint, self.on_progress = path, every, fingerprint, on_progress

    def restore(self, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = load(self.path, ("fingerprint", "done"), device)
        except FedmetaError as err:
            raise FedmetaError(f"{err}; delete it to start the stage over") from None
        if state["fingerprint"] != self.fingerprint:
            print(f"{self.path}: saved for other parameters or inputs; starting over", file=sys.stderr)
            return None
        print(f"{self.path}: resuming an interrupted run ({state['done']} done)", file=sys.stderr)
        return state

    def save(self, done: int, state: dict[str, Any], force: bool = False) -> None:
        if self.on_progress is not None:
            self.on_progress(done)
        if force or done % self.every == 0:
            save(self.path, {"fingerprint": self.fingerprint, "done": done, **state}, now=True)

    def finish(self) -> None:
        """Remove the state once the loop's outputs are written (inside a stage: once they are in place)."""
        atomic.remove(self.path)
