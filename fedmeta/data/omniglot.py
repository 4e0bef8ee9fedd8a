"""Read Omniglot straight from its zip archives (local folder or download).

Images are decoded from the archive in memory, so nothing is extracted and a
hostile entry name can never write outside the project. Characters present in
several archives (Greek and Latin in both small archives) are read once.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import torch
from PIL import Image, UnidentifiedImageError

from fedmeta.data.imageset import ImageSet
from fedmeta.errors import FedmetaError, first_line

URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
URL_ENV = "FEDMETA_OMNIGLOT_URL"  # a mirror holding the same files (http(s):// or file://), instead of URL_PREFIX
CACHE = Path("data/raw/omniglot")  # downloads land here; archives copied or linked here are used as they are
# MD5 of the public files at URL_PREFIX. The full pair holds the paper's 1623 characters (964 + 659, 50 alphabets);
# the small pair an 8-alphabet subset of images_background (242 distinct characters: both hold Greek and Latin).
ARCHIVE_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
}
MAX_DOWNLOAD_BYTES = 100 << 20  # the largest public archive is about 9.5 MB
DOWNLOAD_TIMEOUT_S = 60
ROTATIONS = 4
SOURCE_SIDE = 105
# Bounds on what an archive may make us read: the real archives hold ≤ 20 k drawings of ≤ 4 KB each
# (≈ 10 MB in all), so these leave two orders of magnitude and still keep a zip bomb far from memory.
MAX_ENTRY_BYTES = 1 << 20  # one drawing, uncompressed
MAX_ARCHIVE_BYTES = 1 << 30  # every drawing of one archive, uncompressed
MAX_ENTRIES = 200_000  # drawings in one archive
CHUNK_BYTES = 1 << 16


def fetch_archives(
    source: str, archives: list[str], download_dir: Path = CACHE, md5: dict[str, str] | None = None
) -> list[Path]:
    """Locate the archives in a local folder, or, when `source` is 'download', in the cache `download_dir`
    (downloading those it lacks)."""
    unknown = [a for a in archives if a not in ARCHIVE_MD5]
    if unknown:
        raise FedmetaError(
            f"params.yaml: omniglot.archives: unknown archive {unknown[0]!r}; allowed: some of {sorted(ARCHIVE_MD5)}"
        )
    if source == "download":
        return download_archives(archives, download_dir, md5=md5)
    folder = Path(source)
    if folder.exists() and not folder.is_dir():
        raise FedmetaError(
            f"params.yaml: omniglot.source: {folder} is a file, not a folder; point it at a folder holding "
            f"{', '.join(archives)} or set it to 'download'"
        )
    if not folder.is_dir():
        raise FedmetaError(
            f"params.yaml: omniglot.source: folder {folder} does not exist; point it at a folder holding "
            f"{', '.join(archives)} or set it to 'download'"
        )
    paths = [folder / a for a in archives]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FedmetaError(
            f"params.yaml: omniglot.source: {missing[0]} is missing; "
            f"expected the archives {', '.join(archives)} in {folder}"
        )
    return paths


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_archives(
    names: list[str], cache: Path, base_url: str | None = None, md5: dict[str, str] | None = None
) -> list[Path]:
    """Each archive from the cache when it is there with the right MD5, otherwise downloaded into it.

    The base URL is `base_url`, else $FEDMETA_OMNIGLOT_URL, else the public repository; `md5` overrides the
    expected checksums (tests serve synthetic archives). A download is written to a temporary file beside its
    destination and renamed only once its MD5 matches, so the cache never holds a partial or corrupted archive.
    """
    base = (base_url or os.environ.get(URL_ENV) or URL_PREFIX).rstrip("/")
    expected = {**ARCHIVE_MD5, **(md5 or {})}
    paths = []
    for name in names:
        path = cache / name
        if path.is_file():
            got = file_md5(path)
            if got != expected[name]:
                raise FedmetaError(
                    f"{path}: MD5 {got} differs from the public archive's {expected[name]}; replace it with the "
                    "public file or delete it to download it again"
                )
        else:
            _download(f"{base}/{name}", path, expected[name])
        paths.append(path)
    return paths


def _download(url: str, path: Path, want: str) -> None:
    import urllib.request

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedmetaError(f"{path.parent}: cannot create the download cache ({first_line(exc)})") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        digest, size = hashlib.md5(usedforsecurity=False), 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(CHUNK_BYTES):
                        size += len(chunk)
                        if size > MAX_DOWNLOAD_BYTES:
                            raise FedmetaError(
                                f"{url}: larger than {MAX_DOWNLOAD_BYTES} bytes, not an Omniglot archive; refused"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, a malformed URL
                raise FedmetaError(
                    f"omniglot: downloading {path.name} from {url} failed ({type(exc).__name__}: {first_line(exc)}); "
                    f"offline, copy or link the archives into {path.parent}/ (data/README.md)"
                ) from None
        got = digest.hexdigest()
        if got != want:
            raise FedmetaError(
                f"{path.name}: downloaded from {url}, its MD5 {got} differs from the expected {want}; "
                "refused, nothing kept"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_sizes(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse an archive whose headers declare more than the caps, before any entry is read."""
    if len(infos) > MAX_ENTRIES:
        raise FedmetaError(
            f"{path}: holds {len(infos)} drawings, more than the {MAX_ENTRIES} allowed; refusing the archive"
        )
    total = 0
    for info in infos:
        if info.file_size > MAX_ENTRY_BYTES:
            raise FedmetaError(
                f"{path}: entry {info.filename!r} declares {info.file_size} bytes uncompressed, "
                f"more than the {MAX_ENTRY_BYTES} a drawing may take (a zip bomb?); refusing the archive"
            )
        total += info.file_size
    if total > MAX_ARCHIVE_BYTES:
        raise FedmetaError(
            f"{path}: its drawings declare {total} bytes uncompressed, more than the {MAX_ARCHIVE_BYTES} allowed; "
            "refusing the archive"
        )


def _read_capped(stream: io.BufferedIOBase, cap: int, where: str) -> bytes:
    """An entry's bytes, read in chunks and refused once they pass `cap`, whatever its header said."""
    parts, size = [], 0
    while chunk := stream.read(CHUNK_BYTES):
        size += len(chunk)
        if size > cap:
            raise FedmetaError(
                f"{where}: decompresses to more than {cap} bytes, more than its header declares or a drawing may take; "
                "refusing the archive"
            )
        parts.append(chunk)
    return b"".join(parts)


def _characters(path: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Map 'alphabet/character' to its (drawing name, PNG bytes), validating every entry name and size."""
    chars: dict[str, list[tuple[str, bytes]]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            drawings = []
            for info in zf.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise FedmetaError(
                        f"{path}: entry {info.filename!r} would escape the dataset folder; refusing the archive"
                    )
                if info.is_dir() or name.suffix.lower() != ".png":
                    continue
                if len(name.parts) != 4:
                    raise FedmetaError(
                        f"{path}: entry {info.filename!r} is not <root>/<alphabet>/<character>/<drawing>.png"
                    )
                drawings.append(info)
            _check_sizes(path, drawings)
            budget = MAX_ARCHIVE_BYTES
            for info in drawings:
                _, alphabet, character, drawing = PurePosixPath(info.filename).parts
                with zf.open(info) as stream:
                    data = _read_capped(stream, min(MAX_ENTRY_BYTES, budget), f"{path}: entry {info.filename!r}")
                budget -= len(data)
                chars.setdefault(f"{alphabet}/{character}", []).append((drawing, data))
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: an encrypted entry; NotImplementedError: an unknown compression method
        raise FedmetaError(f"{path}: not a readable zip archive ({first_line(exc)})") from None
    if not chars:
        raise FedmetaError(f"{path}: holds no Omniglot drawings (<root>/<alphabet>/<character>/<drawing>.png)")
    return chars


def _decode(data: bytes, where: str, image_size: int) -> torch.Tensor:
    """105×105 grey drawing → image_size² uint8 with ink bright (255) on a dark background."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            # checked before decoding: no bomb is ever expanded
            if img.size != (SOURCE_SIDE, SOURCE_SIDE) or img.mode not in ("1", "L"):
                raise FedmetaError(
                    f"{where}: expected a {SOURCE_SIDE}×{SOURCE_SIDE} grey-scale image, "
                    f"got {img.size[0]}×{img.size[1]} mode {img.mode}"
                )
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FedmetaError(f"{where}: refused as a decompression bomb ({first_line(exc)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        why = "unknown image format" if isinstance(exc, UnidentifiedImageError) else first_line(exc)
        raise FedmetaError(f"{where}: not a readable PNG ({why})") from None
    img = img.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, image_size, image_size)
    return 255 - pixels


def load_omniglot(archives: list[Path], image_size: int = 28, rotations: bool = True) -> ImageSet:
    """All characters of the archives, deduplicated by name; each rotation becomes its own class."""
    merged: dict[str, tuple[Path, list[tuple[str, bytes]]]] = {}
    for path in archives:
        for char, drawings in _characters(path).items():
            merged.setdefault(char, (path, drawings))
    images, labels, names, groups = [], [], [], []
    n_rot = ROTATIONS if rotations else 1
    for group, char in enumerate(sorted(merged)):
        path, drawings = merged[char]
        base = torch.stack([_decode(data, f"{path}:{char}/{d}", image_size) for d, data in sorted(drawings)])
        for r in range(n_rot):
            labels.append(torch.full((len(base),), len(names), dtype=torch.int64))
            images.append(torch.rot90(base, r, dims=(2, 3)))
            names.append(f"{char}/rot{90 * r}")
            groups.append(group)
    return ImageSet(torch.cat(images).contiguous(), torch.cat(labels), names, torch.tensor(groups))
