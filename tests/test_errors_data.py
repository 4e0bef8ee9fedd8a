"""Bad data files: dataset archives and images, within bounds.

Bad input: one line naming the culprit, exit code 2, and no output created or changed.

Most cases run the CLI's entry point (`fedmeta.cli.main`, what `fedmeta <stage>` runs) in this process, in a
fresh working directory: a process of its own would spend seconds importing torch and MLflow for a check that takes
milliseconds. The cases that need a process of their own (--debug's traceback, a stage whose code is patched, the
prepared dataset the others share) start the real `python -m fedmeta`; the rest call the library function that does
the check. docs/errors.md lists every message.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from errors_common import ARCHIVES, DRAWING, add_entry, archive_dir, png, refused, workdir

from fedmeta.data.omniglot import fetch_archives, load_omniglot
from fedmeta.errors import FedmetaError

from conftest import drawing, tiny_raw

# --- dataset files -----------------------------------------------------------


def test_cli_missing_archive_folder(tmp_path: Path, store: Path) -> None:
    cwd = workdir(tmp_path / "w", tiny_raw(tmp_path / "nowhere"), store)
    refused(cwd, "prepare", culprit=("params.yaml: omniglot.source: folder", "nowhere", "does not exist"))


def test_missing_archive(tmp_path: Path, omniglot_dir: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    (src / ARCHIVES[1]).unlink()
    with pytest.raises(FedmetaError, match=f"params.yaml: omniglot.source: {src / ARCHIVES[1]} is missing"):
        fetch_archives(str(src), list(ARCHIVES), tmp_path / "unused")


def test_unknown_archive(tmp_path: Path, omniglot_dir: Path) -> None:
    with pytest.raises(
        FedmetaError,
        match="params.yaml: omniglot.archives: unknown archive 'images_background_small3.zip'; allowed: some of",
    ):
        fetch_archives(str(omniglot_dir), ["images_background_small3.zip"], tmp_path / "unused")


def test_cli_truncated_archive(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    (src / ARCHIVES[0]).write_bytes((omniglot_dir / ARCHIVES[0]).read_bytes()[:5000])
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "not a readable zip archive")
    )


def test_cli_archive_with_corrupt_entry(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    with (
        zipfile.ZipFile(omniglot_dir / ARCHIVES[0]) as good,
        zipfile.ZipFile(src / ARCHIVES[0], "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in good.infolist():
            out.writestr(info.filename, good.read(info))
    data = bytearray((src / ARCHIVES[0]).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    (src / ARCHIVES[0]).write_bytes(bytes(data))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store), "prepare", culprit=(ARCHIVES[0], "not a readable zip archive")
    )


def test_cli_archive_entry_escaping_the_folder(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], "../evil.png", drawing(0, 0))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store),
        "prepare",
        culprit=(ARCHIVES[0], "entry '../evil.png' would escape the dataset folder"),
    )
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "w" / "evil.png").exists()


def test_cli_image_of_the_wrong_size(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, png((50, 40), "L"))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store),
        "prepare",
        culprit=(DRAWING.split("/", 1)[1], "expected a 105×105 grey-scale image, got 50×40 mode L"),
    )


@pytest.mark.parametrize(
    ("name", "data", "culprit"),
    [
        ("images_background_small1/../../evil.png", drawing(0, 0), "would escape the dataset folder"),
        ("/tmp/evil.png", drawing(0, 0), "would escape the dataset folder"),
        (DRAWING, png((105, 105), "RGB"), "expected a 105×105 grey-scale image, got 105×105 mode RGB"),
        (DRAWING, b"\x89PNG\r\n\x1a\n but not really", "not a readable PNG (unknown image format)"),
        (
            "images_background_small1/Alpha/stray.png",
            drawing(0, 0),
            "is not <root>/<alphabet>/<character>/<drawing>.png",
        ),
    ],
    ids=["nested-escape", "absolute", "rgb", "undecodable", "wrong-depth"],
)
def test_bad_archive_entry(tmp_path: Path, omniglot_dir: Path, name: str, data: bytes, culprit: str) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], name, data)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / a for a in ARCHIVES])
    assert ARCHIVES[0] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("contents", "culprit"),
    [(b"PK\x03\x04 not a zip", "not a readable zip archive"), (None, "holds no Omniglot drawings")],
    ids=["garbage", "no-drawings"],
)
def test_unusable_archive(tmp_path: Path, contents: bytes | None, culprit: str) -> None:
    path = tmp_path / ARCHIVES[0]
    if contents is None:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("images_background_small1/README.txt", "no drawings here")
    else:
        path.write_bytes(contents)
    with pytest.raises(FedmetaError, match=culprit):
        load_omniglot([path])


# --- archives and images within bounds -------------------------------------------


def lying_png(width: int, height: int) -> bytes:
    """A 1×1 grey PNG whose header claims width × height (its CRC fixed up, so only the size lies)."""
    import struct
    import zlib

    data = bytearray(png((1, 1), "L"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def lie_about_size(archive: Path, entry: str, claimed: int) -> None:
    """Rewrite the uncompressed size `entry`'s local and central headers declare."""
    import struct

    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(entry)
        real, local_at = info.file_size, info.header_offset
    data = bytearray(archive.read_bytes())
    assert struct.unpack("<I", data[local_at + 22 : local_at + 26])[0] == real
    data[local_at + 22 : local_at + 26] = struct.pack("<I", claimed)
    name, at = entry.encode(), data.index(b"PK\x01\x02")  # the central directory's records, in order
    while data[at + 46 : at + 46 + len(name)] != name:
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 24 : at + 28] = struct.pack("<I", claimed)
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("size", "culprit"),
    [
        ((60000, 60000), "refused as a decompression bomb"),
        ((9000, 9000), "expected a 105×105 grey-scale image, got 9000×9000"),
    ],
    ids=["60000x60000", "9000x9000"],
)
def test_image_bomb_in_an_archive_is_refused_before_decoding(
    tmp_path: Path, omniglot_dir: Path, size: tuple[int, int], culprit: str
) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, lying_png(*size))
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / a for a in ARCHIVES])
    assert DRAWING.split("/", 1)[1] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


def test_cli_image_bomb_in_an_archive(tmp_path: Path, omniglot_dir: Path, store: Path) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, lying_png(60000, 60000))
    refused(
        workdir(tmp_path / "w", tiny_raw(src), store),
        "prepare",
        culprit=(DRAWING.split("/", 1)[1], "refused as a decompression bomb"),
    )


def test_zip_entry_declaring_a_huge_size_is_refused_before_anything_is_read(
    tmp_path: Path, omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = archive_dir(tmp_path / "archives", omniglot_dir)
    add_entry(src / ARCHIVES[0], DRAWING, drawing(0, 0))
    lie_about_size(src / ARCHIVES[0], DRAWING, 1 << 30)  # a 1 GiB entry, as far as the headers go

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("an entry was read before the sizes were checked")

    monkeypatch.setattr(zipfile.ZipFile, "open", never)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([src / ARCHIVES[0]])
    assert f"entry {DRAWING!r} declares 1073741824 bytes uncompressed, more than the 1048576 a drawing may take" in str(
        err.value
    ) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cap", "culprit"),
    [("MAX_ARCHIVE_BYTES", "its drawings declare"), ("MAX_ENTRIES", "drawings, more than the 100 allowed")],
    ids=["total", "count"],
)
def test_archive_over_the_total_caps_is_refused(
    omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch, cap: str, culprit: str
) -> None:
    from fedmeta.data import omniglot

    monkeypatch.setattr(omniglot, cap, 100)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([omniglot_dir / ARCHIVES[0]])
    assert ARCHIVES[0] in str(err.value) and culprit in str(err.value) and "\n" not in str(err.value)


def test_zip_entry_larger_than_its_header_says_is_cut_off_while_reading(
    tmp_path: Path, omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers can lie: with the header check passed (as a lying header would pass it), reading stops at the cap."""
    from fedmeta.data import omniglot

    monkeypatch.setattr(omniglot, "_check_sizes", lambda path, infos: None)
    monkeypatch.setattr(omniglot, "MAX_ENTRY_BYTES", 100)
    with pytest.raises(FedmetaError) as err:
        load_omniglot([omniglot_dir / ARCHIVES[0]])
    assert "decompresses to more than 100 bytes" in str(err.value) and "entry 'images_background_small1/" in str(
        err.value
    )
    with pytest.raises(FedmetaError, match="w: decompresses to more than 10 bytes"):
        omniglot._read_capped(io.BytesIO(b"\0" * 1000), 10, "w")
    assert omniglot._read_capped(io.BytesIO(b"\0" * 10), 10, "w") == b"\0" * 10


def test_miniimagenet_image_bomb_is_refused(tmp_path: Path) -> None:
    from fedmeta.data.miniimagenet import load_miniimagenet

    for split in ("train", "val", "test"):
        (tmp_path / split / f"n0{split}").mkdir(parents=True)
        (tmp_path / split / f"n0{split}" / "a.png").write_bytes(png((4, 4), "L"))
    (tmp_path / "train" / "n0train" / "b.png").write_bytes(lying_png(60000, 60000))
    with pytest.raises(FedmetaError) as err:
        load_miniimagenet(tmp_path, 16)
    assert str(err.value).startswith(
        f"{tmp_path / 'train/n0train/b.png'}: refused as a decompression bomb"
    ) and "\n" not in str(err.value)
