"""Write-then-rename, so an interrupted or failed stage never leaves a half-written output, and all-or-none staging,
so a stage that fails after writing some outputs (a full disk, a read-only folder, the MLflow store) leaves every
previous output as it was: each file goes to a temporary file beside it, and the renames happen together at the
end."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedmeta.errors import FedmetaError

# What each kind of output is, for the message when it cannot be written
KINDS = {".pt": "checkpoint", ".json": "JSON file", ".csv": "CSV file", ".png": "figure", ".md": "report"}

# The open all-or-none block's staged files: resolved final path → (the path as given, its temporary file); None: no
# block open
_staged: dict[Path, tuple[Path, Path]] | None = None
_removed: list[Path] = []  # files the open block removes when it succeeds


def what(path: Path) -> str:
    return KINDS.get(path.suffix, "file")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError inside, whichever file it hit (a hidden temporary one, or none named: a full disk), becomes one
    line naming `path`, what it is, and the system's reason."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FedmetaError(f"{path}: cannot write this {what(path)} ({reason}); nothing was written") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], now: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds, rename it onto `path`, or, inside an
    `all_or_none` block (unless `now`: a stage's resumable state, files other processes wait for), when that
    block succeeds."""
    final = Path(path)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    keep = False
    try:
        with writing(final):
            yield tmp_path
            tmp_path.chmod(0o644)
            if _staged is None or now:
                os.replace(tmp_path, final)
            else:
                _forget(final)
                _staged[final.resolve()] = (final, tmp_path)
                keep = True
    finally:
        if not keep:
            tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str, now: bool = False) -> None:
    with atomic_path(path, now) as tmp:
        tmp.write_text(text)


def current(path: str | os.PathLike[str]) -> Path:
    """Where `path`'s content is now: its staged temporary file inside an `all_or_none` block, else `path`."""
    final = Path(path)
    return (_staged or {}).get(final.resolve(), (final, final))[1]


def remove(path: Path) -> None:
    """Delete `path` (if it is there), or, inside an `all_or_none` block, when that block succeeds: a stage's
    resumable state goes only once its outputs are in place."""
    if _staged is None:
        path.unlink(missing_ok=True)
    else:
        _removed.append(path)


def _forget(final: Path) -> None:
    """Drop a file staged earlier for the same path (written twice in one block: the last one counts)."""
    earlier = (_staged or {}).pop(final.resolve(), None)
    if earlier is not None:
        earlier[1].unlink(missing_ok=True)


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Every `atomic_path` inside is staged; the files are renamed into place together when the block succeeds,
    and all removed when it fails. A rename within one folder cannot run out of space, so once the block's code
    is done, only a crash between renames could leave some outputs new and others old."""
    global _staged
    if _staged is not None:  # nested: the outer block decides
        yield
        return
    _staged = {}
    try:
        yield
        staged = _staged
        for key, (final, tmp) in list(staged.items()):
            with writing(final):
                os.replace(tmp, final)
            del staged[key]
        for path in _removed:
            path.unlink(missing_ok=True)
    finally:
        for _, tmp in (_staged or {}).values():
            tmp.unlink(missing_ok=True)
        _staged = None
        _removed.clear()
