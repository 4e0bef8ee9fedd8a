"""Read mini-ImageNet from whichever of its common on-disk layouts is present.

The dataset circulates as Ravi-Larochelle CSVs over one image folder, as
pickle caches of decoded arrays, and as class-per-folder trees; all three
carry the same fixed 64/16/20 class split, which is kept as `fixed_split`.
"""

from __future__ import annotations

import csv
import pickle
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fedmeta.data.imageset import ImageSet
from fedmeta.errors import FedmetaError, first_line

SPLITS = ("train", "val", "test")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
_LAYOUTS = (
    "images/ + train.csv, val.csv, test.csv (Ravi-Larochelle); "
    "mini-imagenet-cache-{train,val,test}.pkl; "
    "or train/, val/, test/ holding one folder per class"
)

Opener = Callable[[], Image.Image]  # decodes one image only when it is copied into the tensor
Classes = dict[str, list[Opener]]  # wnid -> its images, in file order


def load_miniimagenet(root: Path, image_size: int = 84) -> ImageSet:
    """Load every split under `root` as RGB uint8 [n, 3, image_size, image_size].

    Classes are numbered train, then val, then test, sorted by wnid within a
    split, so the same data gives the same labels whatever its layout.
    """
    root = Path(root)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise FedmetaError(f"image_size: expected a positive integer, got {image_size!r}")
    if not root.is_dir():
        raise FedmetaError(f"{root}: mini-ImageNet root does not exist or is not a directory")
    csvs = {s: root / f"{s}.csv" for s in SPLITS}
    pickles = {s: root / f"mini-imagenet-cache-{s}.pkl" for s in SPLITS}
    folders = {s: root / s for s in SPLITS}
    if (root / "images").is_dir() and all(p.is_file() for p in csvs.values()):
        splits = {s: (p, _read_csv(p, root / "images")) for s, p in csvs.items()}
    elif all(p.is_file() for p in pickles.values()):
        splits = {s: (p, _read_pickle(p)) for s, p in pickles.items()}
    elif all(p.is_dir() for p in folders.values()):
        splits = {s: (p, _read_folders(p)) for s, p in folders.items()}
    else:
        raise FedmetaError(f"{root}: no recognised mini-ImageNet layout; expected {_LAYOUTS}")
    return _assemble(splits, image_size)


def _read_csv(csv_path: Path, image_dir: Path) -> Classes:
    """Group the images a Ravi-Larochelle `filename,label` CSV names by wnid."""
    classes: Classes = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header != ["filename", "label"]:
                got = ",".join(header) if header else "an empty file"
                raise FedmetaError(f"{csv_path}: expected header 'filename,label', got {got!r}")
            for row in rows:
                if not row:
                    continue
                if len(row) != 2 or not all(row):
                    raise FedmetaError(
                        f"{csv_path}: line {rows.line_num}: expected 'filename,label', got {','.join(row)!r}"
                    )
                path = image_dir / row[0]
                if not path.is_file():
                    raise FedmetaError(f"{csv_path}: line {rows.line_num} names missing image {path}")
                classes.setdefault(row[1], []).append(partial(_open_image, path))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FedmetaError(f"{csv_path}: not a readable CSV ({exc})") from exc
    return classes


def _read_folders(split_dir: Path) -> Classes:
    """Treat each non-hidden subfolder of `split_dir` as one class named by its wnid."""
    classes: Classes = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not files:
            raise FedmetaError(f"{class_dir}: class folder holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        classes[class_dir.name] = [partial(_open_image, p) for p in files]
    return classes


def _read_pickle(path: Path) -> Classes:
    """Read one mini-imagenet-cache pickle without letting it run code."""
    try:
        import numpy as np
    except ImportError as exc:
        raise FedmetaError(f"{path}: reading the pickle layout needs numpy, which is not installed") from exc
    try:
        with path.open("rb") as f:
            cache = _NumpyOnlyUnpickler(f, path, _numpy_globals(np)).load()
    except FedmetaError:
        raise
    except Exception as exc:  # any failure to parse an untrusted file is a bad input
        raise FedmetaError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(cache, dict) or not {"image_data", "class_dict"} <= cache.keys():
        raise FedmetaError(f"{path}: expected a dict with keys 'image_data' and 'class_dict'")
    data, class_dict = cache["image_data"], cache["class_dict"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[3] == 3):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FedmetaError(f"{path}: image_data must be a uint8 array [n, H, W, 3], got {got}")
    if not isinstance(class_dict, dict):
        raise FedmetaError(f"{path}: class_dict must be a dict wnid -> image indices, got {type(class_dict).__name__}")
    classes: Classes = {}
    for wnid, indices in class_dict.items():
        if not (
            isinstance(wnid, str)
            and isinstance(indices, (list, tuple))
            and indices
            and all(isinstance(i, (int, np.integer)) and 0 <= i < len(data) for i in indices)
        ):
            raise FedmetaError(
                f"{path}: class_dict[{wnid!r}] must be a non-empty list of indices into image_data (0..{len(data) - 1})"
            )
        classes[wnid] = [partial(Image.fromarray, data[i]) for i in indices]
    return classes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals that rebuild numpy arrays, so a tampered cache cannot execute anything."""

    def __init__(self, file: Any, path: Path, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file, encoding="latin1")  # latin1 decodes Python 2 array buffers byte for byte
        self._path = path
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise FedmetaError(f"refusing to unpickle {module}.{name} from {self._path}") from None


def _numpy_globals(np: Any) -> dict[tuple[str, str], Any]:
    """Map the array-rebuilding globals, under numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) names."""
    core = getattr(np, "_core", None) or np.core
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return table


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Protocol-2 pickles from Python 3 store bytes as `_codecs.encode(text, 'latin1')`; allow only that."""
    if not isinstance(text, str) or encoding != "latin1":
        raise ValueError(
            f"_codecs.encode is only allowed as (str, 'latin1'), got ({type(text).__name__}, {encoding!r})"
        )
    return text.encode("latin1")


def _open_image(path: Path) -> Image.Image:
    """Decode fully while the file is open, so corrupt data fails here with its path. A header claiming more
    than PIL's MAX_IMAGE_PIXELS (a decompression bomb) is refused before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FedmetaError(f"{path}: refused as a decompression bomb ({first_line(exc)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise FedmetaError(f"{path}: unreadable image ({exc})") from exc


def _to_chw(img: Image.Image, size: int) -> torch.Tensor:
    """Resize (antialiased bilinear) to size x size RGB and return uint8 [3, size, size]."""
    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def _assemble(splits: dict[str, tuple[Path, Classes]], image_size: int) -> ImageSet:
    """Number classes split by split, check the splits are non-empty and disjoint, and decode all images."""
    class_names: list[str] = []
    fixed_split: dict[str, list[int]] = {}
    split_of: dict[str, str] = {}
    openers: list[Opener] = []
    labels: list[int] = []
    for split, (source, classes) in splits.items():
        if not classes:
            raise FedmetaError(f"{source}: the {split} split has no classes")
        fixed_split[split] = []
        for wnid in sorted(classes):
            if wnid in split_of:
                raise FedmetaError(f"{source}: class {wnid} is already in the {split_of[wnid]} split")
            split_of[wnid] = split
            fixed_split[split].append(len(class_names))
            labels += [len(class_names)] * len(classes[wnid])
            openers += classes[wnid]
            class_names.append(wnid)
    images = torch.empty((len(openers), 3, image_size, image_size), dtype=torch.uint8)
    for i, open_one in enumerate(openers):
        images[i] = _to_chw(open_one(), image_size)
    return ImageSet(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
        groups=torch.arange(len(class_names), dtype=torch.int64),
        fixed_split=fixed_split,
    )
