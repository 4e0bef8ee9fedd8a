"""What every stage does around its work: parameters, threads, determinism, files, tracking."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from fedmeta import atomic, config, tracking
from fedmeta.atomic import write_text
from fedmeta.errors import Diverged, FedmetaError

T = TypeVar("T")

PREPARED = Path("data/prepared/dataset.pt")
CHECKPOINTS = Path("checkpoints")
STATE = Path("state")  # resumable progress of long stages (persisted by DVC)
METRICS = Path("metrics")
FIGURES = METRICS / "figures"  # figures showing dataset images: DVC-cached, never in git
CURVES = Path("docs/figures")  # figures of our own numbers: git-tracked, shown in the README


def device_of(params: config.Config) -> torch.device:
    try:
        dev = torch.device(params.device)
    except RuntimeError:
        raise FedmetaError(f"params.yaml: device: expected 'cpu' or 'cuda[:N]', got {params.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FedmetaError("params.yaml: device: 'cuda' requested but no CUDA device is available")
    return dev


def configure(params: config.Config) -> None:
    """Fixed threads and deterministic kernels: the same params give the same bytes on the same machine."""
    torch.set_num_threads(params.threads)
    configure_device(params.device)


def configure_device(device: str) -> None:
    """On CUDA: deterministic kernels (CPU kernels used here are deterministic already; the switch costs
    ~2 s of imports, so only CUDA pays it) and true float32 in convolutions and matrix products, where
    cuDNN would use TF32 (10-bit mantissas) by default, so a GPU run differs from a CPU run by float32
    round-off only."""
    if device.startswith("cuda"):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def progress(items: Iterable[T], description: str, start: int = 0, total: int | None = None) -> Iterator[T]:
    """A rich progress bar over a long loop (resumed loops start part-way)."""
    with progress_bar(description, total, start) as update:
        for done, item in enumerate(items, start + 1):
            yield item
            update(done)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, start: int = 0) -> Iterator[Callable[[int], None]]:
    """A rich progress bar for a loop that reports its own count: the context gives `update(done)`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=start)
        yield lambda done: bar.update(task, completed=done)


def json_text(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_json(path: Path, values: dict[str, Any]) -> None:
    write_text(path, json_text(values))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, csv_text(rows))


def read_csv(path: Path) -> list[dict[str, Any]]:
    """What write_csv wrote: counters as int, labels as str, accuracies as float; anything else (a merge
    conflict, a truncated or hand-edited file) is refused in one line naming the file."""
    try:
        with path.open(newline="") as f:
            rows = [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error) as exc:  # a missing field reads as None, an extra one as a list
        raise _unreadable(path, f"{type(exc).__name__}: {exc}") from None
    if not rows:
        raise _unreadable(path, "no rows")
    return rows


def read_json(path: Path) -> Any:
    """What write_json wrote; anything else is refused in one line naming the file."""
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


CONFLICT_MARKERS = ("<<<<<<< ", "=======", ">>>>>>> ")


def _unreadable(path: Path, why: str) -> FedmetaError:
    """The one-line refusal of a metrics file; git's conflict markers, when there, are the likely cause."""
    lines = path.read_text(errors="replace").splitlines()
    marked = next((i for i, line in enumerate(lines, 1) if line.startswith(CONFLICT_MARKERS)), None)
    if marked is not None:
        why = f"git merge-conflict markers from line {marked}; resolve the conflict (or rerun the stage that writes it)"
    else:
        why += "; rerun the stage that writes it"
    return FedmetaError(f"{path}: not a readable metrics file ({why})")


def _value(key: str, text: str) -> Any:
    if key in ("removed", "scenario"):
        return text
    return int(text) if key in ("round", "step", "steps") else float(text)


def logged(params: config.Config) -> dict[str, Any]:
    """What MLflow records of a run's parameters: all but the other profiles, the chosen one as `budget`."""
    raw = params.model_dump(mode="json")
    return {k: v for k, v in raw.items() if k != "profiles"} | {"budget": raw["profiles"][params.profile]}


@contextlib.contextmanager
def stage(
    name: str, params_path: Path = Path("params.yaml"), **tags: str
) -> Iterator[tuple[config.Config, tracking.Run]]:
    """The stage's parameters and MLflow run. Its outputs are staged (`atomic.all_or_none`) and put in place together
    only once the stage's code and its MLflow logging have both succeeded: a failure anywhere changes none."""
    params = config.load(params_path)
    configure(params)
    with (
        atomic.all_or_none(),
        tracking.stage_run(name, logged(params), {"profile": params.profile, "dataset": params.dataset, **tags}) as run,
    ):
        try:
            yield params, run
        except Diverged as err:  # name the stage; nothing was written (outputs come after the loops, atomically)
            raise Diverged(" ".join([name, *tags.values()]) + f": {err}") from None
